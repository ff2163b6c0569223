"""The client config file: load/save, contexts, merge, and errors."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from basalt.machinery.client import (
    ClientConfig,
    Context,
    default_client_config_path,
    load_client_config,
)
from basalt.machinery.client.config import (
    ENV_VAR,
    issue_client_context,
    parse_client_config,
    save_client_config,
)
from basalt.machinery.config.secrets import SecretsBundle
from basalt.machinery.errors import (
    ClientConfigError,
    ConfigSyntaxError,
    ConfigValidationError,
)
from basalt.machinery.pki import (
    CertificateAndKey,
    certificate_organizations,
    key_matches_certificate,
    verify_issued_by,
)
from basalt.machinery.roles import Role
from tests.fakes import inputs


def context(endpoint: str = "192.0.2.10") -> Context:
    return Context(endpoints=[endpoint], nodes=[endpoint], ca="CA", crt="CRT", key="KEY")


def config(current: str | None, **contexts: Context) -> ClientConfig:
    return ClientConfig(context=current, contexts=contexts)


# -- files ----------------------------------------------------------------------------------


def test_save_then_load_round_trips_with_owner_only_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config"
    original = config("prod", prod=context(), lab=context("10.0.0.1"))
    save_client_config(original, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_client_config(path) == original
    assert os.listdir(path.parent) == ["config"]


def test_save_replaces_a_world_readable_file_with_a_private_one(tmp_path: Path) -> None:
    path = tmp_path / "config"
    path.write_text("context: old\n")
    path.chmod(0o644)
    save_client_config(config("a", a=context()), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_client_config(path).context == "a"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ClientConfigError) as caught:
        load_client_config(tmp_path / "nope")
    assert str(caught.value) == f"client config {tmp_path / 'nope'} does not exist"
    assert caught.value.hint is not None and "--basaltconfig" in caught.value.hint
    assert load_client_config(tmp_path / "nope", missing_ok=True) == ClientConfig()


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ClientConfigError, match="cannot be read"):
        load_client_config(tmp_path)
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ClientConfigError, match="cannot be read"):
        load_client_config(tmp_path / "bin")


def test_empty_file_is_an_empty_config() -> None:
    assert parse_client_config("", "cfg") == ClientConfig()
    assert parse_client_config("# nothing\n", "cfg") == ClientConfig()


@pytest.mark.parametrize("text", ["- a\n", "text\n", "a: 1\n---\nb: 2\n"])
def test_not_one_mapping(text: str) -> None:
    with pytest.raises(ClientConfigError, match=r"^cfg: a client config is one YAML mapping$"):
        parse_client_config(text, "cfg")


def test_yaml_syntax_error() -> None:
    with pytest.raises(ConfigSyntaxError, match=r"^cfg:2:"):
        parse_client_config("context: a\ncontexts: a: b\n", "cfg")


def test_unknown_field_in_a_context_suggests_the_right_one() -> None:
    text = (
        "context: prod\ncontexts:\n  prod:\n"
        "    endpoint: [192.0.2.10]\n    ca: a\n    crt: b\n    key: c\n"
    )
    with pytest.raises(ConfigValidationError) as caught:
        parse_client_config(text, "cfg")
    (problem,) = caught.value.problems
    assert problem.where == "basaltconfig.contexts.prod.endpoint"
    assert problem.hint == "did you mean 'endpoints'?"
    assert (problem.source, problem.line) == ("cfg", 4)


def test_missing_and_unknown_top_level_fields() -> None:
    text = "contxt: prod\ncontexts:\n  prod:\n    endpoints: []\n"
    with pytest.raises(ConfigValidationError) as caught:
        parse_client_config(text, "cfg")
    paths = {p.path: p for p in caught.value.problems}
    assert set(paths) == {"contxt", "contexts.prod.ca", "contexts.prod.crt", "contexts.prod.key"}
    assert paths["contxt"].hint == "did you mean 'context'?"


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "c"))
    assert default_client_config_path() == tmp_path / "c"
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_client_config_path() == tmp_path / ".basalt" / "config"


# -- contexts ---------------------------------------------------------------------------------


def test_current_context() -> None:
    cfg = config("prod", prod=context(), lab=context("10.0.0.1"))
    assert cfg.current() == ("prod", cfg.contexts["prod"])
    assert cfg.current("lab") == ("lab", cfg.contexts["lab"])


def test_current_without_a_selected_context() -> None:
    with pytest.raises(ClientConfigError) as caught:
        config(None, prod=context()).current()
    assert str(caught.value) == "no context selected in the client config"
    assert caught.value.hint is not None and "use-context" in caught.value.hint


def test_current_with_a_missing_context_lists_the_known_ones() -> None:
    with pytest.raises(ClientConfigError) as caught:
        config("staging", prod=context(), lab=context()).current()
    assert str(caught.value) == (
        "context 'staging' is not in the client config (contexts: lab, prod)"
    )
    with pytest.raises(ClientConfigError, match=r"\(contexts: none\)"):
        ClientConfig().current("x")


# -- merge -------------------------------------------------------------------------------------


def test_merge_adds_new_contexts_and_switches_to_the_merged_current() -> None:
    mine = config("lab", lab=context("10.0.0.1"))
    renamed = mine.merge(config("prod", prod=context()))
    assert renamed == []
    assert sorted(mine.contexts) == ["lab", "prod"]
    assert mine.context == "prod"


def test_merge_renames_conflicting_contexts() -> None:
    mine = config("prod", prod=context("10.0.0.1"))
    assert mine.merge(config("prod", prod=context("10.0.0.2"))) == [("prod", "prod-1")]
    assert mine.merge(config("prod", prod=context("10.0.0.3"))) == [("prod", "prod-2")]
    assert mine.contexts["prod"].endpoints == ["10.0.0.1"]
    assert mine.contexts["prod-1"].endpoints == ["10.0.0.2"]
    assert mine.contexts["prod-2"].endpoints == ["10.0.0.3"]
    assert mine.context == "prod-2"


def test_merge_of_an_identical_context_is_not_a_rename() -> None:
    mine = config("prod", prod=context())
    assert mine.merge(config("prod", prod=context())) == []
    assert list(mine.contexts) == ["prod"]


def test_merge_reuses_an_existing_identical_renamed_copy() -> None:
    mine = config("prod", prod=context("10.0.0.1"), **{"prod-1": context("10.0.0.2")})
    assert mine.merge(config(None, prod=context("10.0.0.2"))) == [("prod", "prod-1")]
    assert sorted(mine.contexts) == ["prod", "prod-1"]
    assert mine.context == "prod"


def test_merge_keeps_the_current_context_when_other_has_none() -> None:
    mine = config("lab", lab=context())
    mine.merge(config(None, prod=context("10.0.0.9")))
    assert mine.context == "lab"


def test_merged_config_survives_a_save(tmp_path: Path) -> None:
    mine = config("prod", prod=context("10.0.0.1"))
    mine.merge(config("prod", prod=context("10.0.0.2")))
    save_client_config(mine, tmp_path / "config")
    assert load_client_config(tmp_path / "config") == mine


# -- issued contexts ---------------------------------------------------------------------------


def test_issue_client_context_signs_with_the_os_ca(secrets: SecretsBundle) -> None:
    os_ca = CertificateAndKey(crt=secrets.certs.os.crt, key=secrets.certs.os.key)
    issued = issue_client_context(
        os_ca, endpoints=["192.0.2.10"], roles=(Role.OPERATOR, Role.READER)
    )
    assert issued.endpoints == ["192.0.2.10"]
    assert issued.nodes == []
    assert issued.ca == os_ca.crt
    assert verify_issued_by(issued.crt, os_ca.crt)
    assert key_matches_certificate(issued.crt, issued.key)
    assert certificate_organizations(issued.crt) == ["os:operator", "os:reader"]
    assert not verify_issued_by(issued.crt, inputs.other_secrets().certs.os.crt)


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("context: [a]\n", "context", "must be a string"),
        ("contexts: [a]\n", "contexts", "must be a mapping"),
        ("contexts:\n  prod: text\n", "contexts.prod", "must be a mapping of fields"),
        ("contexts:\n  prod: {ca: a, crt: b, key: [c]}\n", "contexts.prod.key", "must be a string"),
        (
            "contexts:\n  prod: {ca: a, crt: b, key: c, endpoints: x}\n",
            "contexts.prod.endpoints",
            "must be a list of strings",
        ),
        (
            "contexts:\n  prod: {ca: a, crt: b, key: c, nodes: [1]}\n",
            "contexts.prod.nodes",
            "must be a list of strings",
        ),
        ("contexts:\n  prod: {crt: b, key: c}\n", "contexts.prod.ca", "required field is missing"),
    ],
)
def test_malformed_fields_name_their_path(text: str, path: str, message: str) -> None:
    with pytest.raises(ConfigValidationError) as caught:
        parse_client_config(text, "cfg")
    (problem,) = caught.value.problems
    assert (problem.path, problem.message) == (path, message)
    assert problem.source == "cfg"
    assert problem.line is not None


def test_every_problem_in_a_client_config_is_reported() -> None:
    text = (
        "contxt: a\n"
        "contexts:\n"
        "  one: {ca: a, crt: b}\n"
        "  two: {ca: a, crt: b, key: c, endpoint: [x]}\n"
    )
    with pytest.raises(ConfigValidationError) as caught:
        parse_client_config(text, "cfg")
    assert [(p.path, p.line) for p in caught.value.problems] == [
        ("contxt", 1),
        ("contexts.one.key", 3),
        ("contexts.two.endpoint", 4),
    ]


# -- config add / remove ------------------------------------------------------------------------


def _pem_files(tmp_path: Path, secrets: SecretsBundle) -> tuple[Path, Path, Path]:
    os_ca = CertificateAndKey(crt=secrets.certs.os.crt, key=secrets.certs.os.key)
    issued = issue_client_context(os_ca, endpoints=["192.0.2.10"])
    files = (tmp_path / "ca.crt", tmp_path / "admin.crt", tmp_path / "admin.key")
    for path, text in zip(files, (issued.ca, issued.crt, issued.key), strict=True):
        path.write_text(text)
    return files


def test_add_makes_the_first_context_current_and_refuses_to_replace() -> None:
    mine = ClientConfig()
    assert mine.add("lab", context()) is False
    assert mine.context == "lab"
    mine.add("prod", context("192.0.2.20"))
    assert mine.context == "lab"  # a later one does not take over
    with pytest.raises(ClientConfigError, match="context 'prod' exists already") as refused:
        mine.add("prod", context("192.0.2.30"))
    assert refused.value.hint and "--force" in refused.value.hint
    assert mine.contexts["prod"].endpoints == ["192.0.2.20"]  # unchanged
    assert mine.add("prod", context("192.0.2.30"), force=True) is True
    assert mine.contexts["prod"].endpoints == ["192.0.2.30"]
    with pytest.raises(ClientConfigError, match="empty or has spaces"):
        mine.add("a b", context())


def test_remove_refuses_the_current_context_and_unknown_names() -> None:
    mine = config("lab", lab=context(), prod=context("192.0.2.20"))
    with pytest.raises(ClientConfigError, match="'lab' is the current context") as refused:
        mine.remove("lab")
    assert refused.value.hint and "use-context prod" in refused.value.hint
    with pytest.raises(ClientConfigError, match=r"'nope' is not in .*\(contexts: lab, prod\)"):
        mine.remove("nope")
    assert set(mine.contexts) == {"lab", "prod"}
    mine.remove("prod")
    assert set(mine.contexts) == {"lab"} and mine.context == "lab"
    mine.remove("lab", force=True)
    assert mine.contexts == {} and mine.context is None


def test_context_from_files_checks_each_file(tmp_path: Path, secrets: SecretsBundle) -> None:
    from basalt.machinery.client.config import context_from_files

    ca, crt, key = _pem_files(tmp_path, secrets)
    made = context_from_files(ca, crt, key, endpoints=["192.0.2.10"], nodes=["192.0.2.11"])
    assert (made.ca, made.endpoints, made.nodes) == (ca.read_text(), ["192.0.2.10"], ["192.0.2.11"])
    with pytest.raises(ClientConfigError, match=r"--ca .*missing: cannot be read: No such file"):
        context_from_files(tmp_path / "missing", crt, key, endpoints=["e"])
    with pytest.raises(ClientConfigError, match=r"--crt .*admin.key: not a PEM certificate"):
        context_from_files(ca, key, key, endpoints=["e"])
    with pytest.raises(ClientConfigError, match=r"--key .*ca.crt: not a PEM private key"):
        context_from_files(ca, crt, ca, endpoints=["e"])
    other = tmp_path / "other.key"
    other.write_text(inputs.other_secrets().certs.os.key or "")
    with pytest.raises(ClientConfigError, match="is not the key of the certificate"):
        context_from_files(ca, crt, other, endpoints=["e"])
    with pytest.raises(ClientConfigError, match="at least one endpoint"):
        context_from_files(ca, crt, key)


def test_cli_config_add_and_remove(
    tmp_path: Path, secrets: SecretsBundle, capsys: pytest.CaptureFixture[str]
) -> None:
    from basalt.cli.main import main

    ca, crt, key = _pem_files(tmp_path, secrets)
    path = tmp_path / "basaltconfig"
    files = ["--ca", str(ca), "--crt", str(crt), "--key", str(key)]
    base = ["--basaltconfig", str(path), "config"]
    assert main([*base, "add", "lab", *files, "-e", "192.0.2.10,192.0.2.11", "-n", "n1"]) == 0
    saved = load_client_config(path)
    assert saved.context == "lab"
    assert saved.contexts["lab"].endpoints == ["192.0.2.10", "192.0.2.11"]
    assert saved.contexts["lab"].key == key.read_text()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert main([*base, "add", "prod", *files, "-e", "192.0.2.20"]) == 0
    before = path.read_bytes()
    assert main([*base, "add", "prod", *files, "-e", "192.0.2.30"]) == 1
    assert "context 'prod' exists already" in capsys.readouterr().err
    assert main([*base, "remove", "lab"]) == 1
    assert "'lab' is the current context" in capsys.readouterr().err
    assert main([*base, "remove", "staging"]) == 1
    assert "'staging' is not in the client config" in capsys.readouterr().err
    assert path.read_bytes() == before  # every refusal changed nothing
    assert main([*base, "add", "prod", *files, "-e", "192.0.2.30", "--force"]) == 0
    assert main([*base, "remove", "prod"]) == 0
    assert main([*base, "remove", "lab", "--force"]) == 0
    assert load_client_config(path) == ClientConfig()
    assert "no context is current now" in capsys.readouterr().err
