"""The secrets bundle: generation, round trip, version and field errors."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
import yaml

from basalt.machinery.config.secrets import SecretsBundle, generate_secrets, load_secrets
from basalt.machinery.errors import ConfigSyntaxError, ConfigValidationError, SecretsError
from basalt.machinery.pki import key_matches_certificate, load_certificate
from tests.fakes import inputs


def secrets_text(change: Any = None) -> str:
    data = yaml.safe_load(inputs.session_secrets().to_yaml())
    if change is not None:
        change(data)
    return inputs.dump([data]).removeprefix("---\n")


def test_load_of_generated_round_trips(secrets: SecretsBundle) -> None:
    text = secrets.to_yaml()
    loaded = load_secrets(text, "secrets.yaml")
    assert loaded == secrets
    assert loaded.to_yaml() == text


def test_generated_bundle_is_well_formed(secrets: SecretsBundle) -> None:
    assert secrets.version == "v1alpha1"
    for token in (secrets.tokens.join_token, secrets.tokens.bootstrap_token):
        assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", token)
    for value in (
        secrets.cluster.id,
        secrets.cluster.secret,
        secrets.tokens.secretbox_encryption_secret,
    ):
        assert len(base64.b64decode(value)) == 32
    certs = secrets.certs
    for ca in (certs.os, certs.etcd, certs.kubernetes, certs.kubernetes_aggregator):
        assert ca.key is not None
        assert key_matches_certificate(ca.crt, ca.key)
    assert load_certificate(certs.os.crt).subject.rfc4514_string() == "CN=basalt-os"
    assert "PRIVATE KEY" in certs.kubernetes_service_account.key


def test_two_generated_bundles_share_nothing(secrets: SecretsBundle) -> None:
    other = inputs.other_secrets()
    assert other.cluster.id != secrets.cluster.id
    assert other.tokens.join_token != secrets.tokens.join_token
    assert other.certs.os.key != secrets.certs.os.key


def test_secrets_yaml_uses_camel_case_and_pem_blocks(secrets: SecretsBundle) -> None:
    text = secrets.to_yaml()
    assert text.startswith("version: v1alpha1\n")
    for key in (
        "joinToken:",
        "bootstrapToken:",
        "secretboxEncryptionSecret:",
        "kubernetesAggregator:",
        "kubernetesServiceAccount:",
    ):
        assert key in text
    assert "crt: |\n" in text


@pytest.mark.parametrize("version", ["v2", "v1alpha2", None, 1])
def test_wrong_version_is_refused(version: Any) -> None:
    text = secrets_text(lambda d: d.update(version=version))
    with pytest.raises(SecretsError) as caught:
        load_secrets(text, "secrets.yaml")
    assert str(caught.value) == (
        f"secrets.yaml: unsupported secrets bundle version {version!r}; "
        "this basaltctl reads v1alpha1"
    )
    assert caught.value.hint is not None and "upgrade basaltctl" in caught.value.hint


def test_missing_version_is_refused() -> None:
    with pytest.raises(SecretsError, match="version None"):
        load_secrets(secrets_text(lambda d: d.pop("version")))


@pytest.mark.parametrize("text", ["", "- a\n", "just a string\n", "a: 1\n---\nb: 2\n"])
def test_not_one_mapping_is_refused(text: str) -> None:
    with pytest.raises(SecretsError, match=r"^s\.yaml: a secrets bundle is one YAML mapping$"):
        load_secrets(text, "s.yaml")


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigSyntaxError, match=r"^s\.yaml:2:\d+: YAML syntax error"):
        load_secrets("version: v1alpha1\ncluster: a: b\n", "s.yaml")


def test_bad_fields_are_all_reported_with_paths_and_lines() -> None:
    def change(data: dict[str, Any]) -> None:
        data["tokens"]["joinToken"] = "nope"
        data["cluster"]["id"] = "not base64!"
        data["certs"]["os"]["key"] = inputs.other_secrets().certs.os.key
        data["certs"]["etcd"]["crt"] = "garbage"
        data["cluster"]["secrt"] = data["cluster"].pop("secret")

    text = secrets_text(change)
    with pytest.raises(ConfigValidationError) as caught:
        load_secrets(text, "secrets.yaml")
    error = caught.value
    by_path = {p.path: p for p in error.problems}
    assert set(by_path) == {
        "cluster.id",
        "cluster.secret",
        "cluster.secrt",
        "tokens.joinToken",
        "certs.os",
        "certs.etcd",
    }
    assert all(p.document == "SecretsBundle" and p.source == "secrets.yaml" for p in error.problems)
    assert by_path["tokens.joinToken"].line == inputs.line_of(text, "joinToken: nope")
    assert by_path["cluster.id"].line == inputs.line_of(text, "id: not base64!")
    assert by_path["cluster.secrt"].hint == "did you mean 'secret'?"
    assert by_path["certs.os"].message == "the private key does not belong to the certificate"
    assert "not a PEM certificate" in by_path["certs.etcd"].message
    assert error.message == "secrets.yaml: 6 errors found"


def test_unknown_top_level_field() -> None:
    with pytest.raises(ConfigValidationError) as caught:
        load_secrets(secrets_text(lambda d: d.update(tokenz={})))
    (problem,) = caught.value.problems
    assert (problem.where, problem.hint) == ("SecretsBundle.tokenz", "did you mean 'tokens'?")


def test_service_account_key_that_is_not_a_key() -> None:
    text = secrets_text(lambda d: d["certs"]["kubernetesServiceAccount"].update(key="x"))
    with pytest.raises(ConfigValidationError) as caught:
        load_secrets(text)
    (problem,) = caught.value.problems
    assert problem.path == "certs.kubernetesServiceAccount.key"
    assert "not a PEM private key" in problem.message


def test_generate_secrets_is_fast_enough_to_cache_per_session() -> None:
    # a guard for the test suite's own assumptions, not a benchmark
    bundle = generate_secrets()
    assert isinstance(bundle, SecretsBundle)
