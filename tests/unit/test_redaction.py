"""Secrets never reach an output; a config from other secrets is refused, field by field.

The oracle for "secret" is the secrets bundle, not the model's markings: every private key,
token and shared secret of ``gen secrets`` that a generated config carries must be marked,
and then walked through every output path that texts are built on (diffs, dry-run
details, mode decisions, identity refusals, validation and patch errors, the redacted
config readers get), for two clusters' secrets at once. Events, logs and the API answers of
a live node are walked in ``tests/integration/test_identity.py``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from basalt.machinery.api.machine_pb2 import ApplyMode
from basalt.machinery.config import ConfigBundle, load_bundle, parse_patch, patch_and_check
from basalt.machinery.config.diff import unified_diff
from basalt.machinery.config.identity import (
    IDENTITY,
    IdentityChangeError,
    check_identity,
    identity_changes,
)
from basalt.machinery.config.redact import (
    CHANGED,
    SECRET,
    redact_config_text,
    scrub,
    secret_values,
)
from basalt.machinery.config.secrets import SecretsBundle
from basalt.machinery.errors import BasaltError
from tests.fakes import inputs

MODES = (ApplyMode.AUTO, ApplyMode.NO_REBOOT, ApplyMode.REBOOT, ApplyMode.STAGED, ApplyMode.TRY)


def bundle_secrets(secrets: SecretsBundle) -> list[str]:
    """What ``gen secrets`` makes that must stay secret: every private key and token."""
    certs = secrets.certs
    return [
        secrets.cluster.secret,
        secrets.tokens.join_token,
        secrets.tokens.bootstrap_token,
        secrets.tokens.secretbox_encryption_secret,
        *(ca.key or "" for ca in (certs.os, certs.etcd, certs.kubernetes)),
        certs.kubernetes_aggregator.key or "",
        certs.kubernetes_service_account.key,
    ]


def configs(secrets: SecretsBundle) -> tuple[ConfigBundle, ConfigBundle]:
    generated = inputs.generate_configs(secrets, inputs.options())
    return generated.controlplane, generated.worker


def leaks(text: str, values: list[str]) -> list[str]:
    """The secret values (or a line of a PEM block) found in ``text``."""
    found = []
    for value in values:
        pieces = [value, *(ln for ln in value.splitlines() if len(ln) > 16 and "-----" not in ln)]
        if any(piece in text for piece in pieces):
            found.append(value[:24] + "...")
    return found


@pytest.fixture(scope="module")
def two_clusters() -> tuple[ConfigBundle, ConfigBundle, ConfigBundle, ConfigBundle, list[str]]:
    ours, theirs = inputs.session_secrets(), inputs.other_secrets()
    cp, worker = configs(ours)
    other_cp, other_worker = configs(theirs)
    values = bundle_secrets(ours) + bundle_secrets(theirs)
    return cp, worker, other_cp, other_worker, values


def test_every_secret_of_the_bundle_in_a_config_is_marked_secret(secrets: SecretsBundle) -> None:
    cp, worker = configs(secrets)
    for bundle in (cp, worker):
        raw = bundle.to_raw()
        text = bundle.to_yaml()
        marked = set(secret_values(raw))
        carried = [v for v in bundle_secrets(secrets) if v in text]
        assert carried, "the config carries no secret at all?"
        assert set(carried) <= marked, f"unmarked: {set(carried) - marked}"
    assert len(set(secret_values(cp.to_raw()))) == 9  # token, 5 keys, secret, 2 k8s tokens


def _outputs(old: ConfigBundle, new: ConfigBundle) -> Iterator[tuple[str, str]]:
    """(name, text) of every text an apply of ``new`` over ``old`` can produce."""
    from basalt.machined.apply import decide

    yield "diff", unified_diff(old, new)
    yield "diff-reverse", unified_diff(new, old)
    for mode in MODES:
        try:
            _, details, changes = decide(old, new, mode)
            yield f"decide-{mode}", details + " ".join(c.where for c in changes)
        except BasaltError as exc:
            yield f"decide-{mode}", exc.render()
    try:
        check_identity(old, new, allow=False)
    except IdentityChangeError as exc:
        yield "identity-refusal", exc.render()
    yield "identity-forced", check_identity(old, new, allow=True) or ""
    yield "redacted-config", redact_config_text(new.to_yaml())


def test_no_secret_value_reaches_any_output_path(two_clusters: Any) -> None:
    cp, worker, other_cp, other_worker, values = two_clusters
    pairs = [(cp, other_cp), (worker, other_worker), (cp, worker), (other_cp, cp)]
    seen = set()
    for old, new in pairs:
        for name, text in _outputs(old, new):
            assert not leaks(text, values), f"{name} shows secrets: {leaks(text, values)}"
            seen.add(name)
    assert {"diff", "identity-refusal", "identity-forced", "redacted-config"} <= seen


def test_a_diff_says_which_secrets_changed_and_which_did_not(two_clusters: Any) -> None:
    cp, _, other_cp, _, _ = two_clusters
    raw = cp.to_raw()
    machine = inputs.find(raw, "MachineConfig")
    machine["token"] = inputs.find(other_cp.to_raw(), "MachineConfig")["token"]
    changed = load_bundle(inputs.dump(raw), "changed.yaml")
    diff = unified_diff(cp, changed)
    assert f"-token: {SECRET}" in diff and f"+token: {CHANGED}" in diff
    assert "key:" not in diff  # unchanged secrets do not show up at all
    assert f"key: {SECRET}" in redact_config_text(cp.to_yaml())


def _secret_paths(raw: list[dict[str, Any]]) -> Iterator[tuple[str, tuple[str, ...]]]:
    from basalt.machinery.config._base import DOCUMENT_KINDS
    from basalt.machinery.config.redact import secret_locs

    for document in raw:
        kind = document["kind"]
        for loc in secret_locs(DOCUMENT_KINDS[kind]):
            node: Any = document
            for part in loc:
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                yield kind, loc


def _set(raw: list[dict[str, Any]], kind: str, loc: tuple[str, ...], value: Any) -> str:
    changed = copy.deepcopy(raw)
    node = inputs.find(changed, kind)
    for part in loc[:-1]:
        node = node[part]
    node[loc[-1]] = value
    return inputs.dump(changed)


def test_errors_about_a_secret_field_never_quote_it(two_clusters: Any) -> None:
    """Walk every secret field: a malformed value, a value of the wrong type, and JSON
    patch operations that test, read into and replace it; every error is checked."""
    cp, _, _, _, values = two_clusters
    raw = cp.to_raw()
    paths = list(_secret_paths(raw))
    assert len(paths) == 9
    for kind, loc in paths:
        where = f"{kind}.{'.'.join(loc)}"
        current = inputs.find(raw, kind)
        for part in loc:
            current = current[part]
        texts = []
        for bad in (current + "!", [current], {"v": current}):
            try:
                load_bundle(_set(raw, kind, loc, bad), "bad.yaml")
                texts.append("")
            except BasaltError as exc:
                texts.append(exc.render())
        pointer = "/" + "/".join(loc)
        single = [d for d in raw if d["kind"] == kind]
        operations = [
            {"op": "test", "path": pointer, "value": "not it"},
            {"op": "remove", "path": pointer + "/inner"},
            {"op": "replace", "path": pointer, "value": current + "x"},
        ]
        for operation in operations:
            patch = parse_patch(yaml.safe_dump([operation]), "p.yaml")
            try:
                patch_and_check(single, [patch], target="t")
                texts.append("")
            except BasaltError as exc:
                texts.append(exc.render())
        for text in texts:
            assert not leaks(text, [*values, current + "!"]), f"{where}: {text}"
        assert any(where in t or "test expects" in t for t in texts), where


def test_scrub_removes_values_and_pem_lines(two_clusters: Any) -> None:
    cp, _, _, _, values = two_clusters
    raw = cp.to_raw()
    key = inputs.find(raw, "MachineConfig")["ca"]["key"]
    text = f"boom: {key.splitlines()[1]} and {inputs.find(raw, 'MachineConfig')['token']}"
    assert not leaks(scrub(text, raw), values)


# -- identity ----------------------------------------------------------------------------------


def test_each_identity_field_is_named_alone_when_it_alone_changes(two_clusters: Any) -> None:
    cp, _, other_cp, _, _ = two_clusters
    ours, theirs = cp.to_raw(), other_cp.to_raw()
    assert identity_changes(cp, cp) == []
    for field in IDENTITY:
        if field.path == ("type",):
            continue
        mixed = copy.deepcopy(ours)
        target, source = inputs.find(mixed, field.kind), inputs.find(theirs, field.kind)
        parent = field.path[:-1]
        for part in parent:  # a CA moves with its key: crt and key belong together
            target, source = target[part], source[part]
        if parent and parent[-1] in ("ca", "aggregatorCA"):
            target.update(source)
        else:
            target[field.path[-1]] = source[field.path[-1]]
        changed = identity_changes(cp, load_bundle(inputs.dump(mixed), "mixed.yaml"))
        assert [f.where for f in changed] == [field.where]


def test_a_config_from_other_secrets_is_refused_naming_every_field(two_clusters: Any) -> None:
    cp, worker, other_cp, other_worker, _ = two_clusters
    with pytest.raises(IdentityChangeError) as raised:
        check_identity(cp, other_cp, allow=False)
    text = raised.value.render()
    for name in (
        "MachineConfig.ca.crt",
        "ClusterConfig.id",
        "ClusterConfig.secret",
        "ClusterConfig.etcd.ca.crt",
        "ClusterConfig.kubernetes.ca.crt",
    ):
        assert name in text
    assert "--allow-identity-change" in text and "gen config" in text
    with pytest.raises(IdentityChangeError, match=r"MachineConfig\.type"):
        check_identity(cp, worker, allow=False)
    worker_change = identity_changes(worker, other_worker)
    assert "MachineConfig.ca.crt" in [f.where for f in worker_change]
    assert "MachineConfig.type" not in [f.where for f in worker_change]
    forced = check_identity(cp, other_cp, allow=True)
    assert forced is not None and "stops working" in forced
    assert check_identity(cp, cp, allow=False) is None
