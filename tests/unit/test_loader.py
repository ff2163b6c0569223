"""Loading config text: YAML syntax, document headers, field types, paths and lines."""

from __future__ import annotations

from typing import Any

import pytest

from basalt.machinery.config import ClusterConfig, LinkConfig, MachineConfig, load_bundle
from basalt.machinery.config.bundle import ConfigBundle, bundle_from_raw
from basalt.machinery.errors import ConfigSyntaxError, ConfigValidationError, Problem
from tests.fakes import inputs
from tests.fakes.pki import ed25519_public_pem

API = inputs.API


def problems(text: str, source: str = "cp.yaml") -> list[Problem]:
    with pytest.raises(ConfigValidationError) as caught:
        load_bundle(text, source)
    assert caught.value.source == source
    return caught.value.problems


def only_problem(text: str, source: str = "cp.yaml") -> Problem:
    found = problems(text, source)
    assert len(found) == 1, [p.render() for p in found]
    return found[0]


def edited(change: Any, kind: str = "ClusterConfig") -> str:
    """The default control plane config as text, after ``change(document_of_kind)``."""
    documents = inputs.controlplane_raw()
    change(inputs.find(documents, kind))
    return inputs.dump(documents)


# -- valid input ---------------------------------------------------------------------------


def test_generated_config_loads_with_documents_in_file_order(cp_yaml: str) -> None:
    bundle = load_bundle(cp_yaml, "cp.yaml")
    assert [type(d) for d in bundle.documents] == [MachineConfig, ClusterConfig]
    assert bundle.machine.type == "controlplane"
    assert bundle.cluster.name == "demo"
    assert bundle.source == "cp.yaml"
    assert [raw.line for raw in bundle.raw] == [2, inputs.line_of(cp_yaml, "kind: Cluster") - 1]


def test_dump_is_canonical_and_stable(cp_yaml: str) -> None:
    bundle = load_bundle(cp_yaml)
    assert bundle.to_yaml() == cp_yaml
    assert load_bundle(bundle.to_yaml()).to_raw() == bundle.to_raw()


def test_empty_documents_are_skipped(cp_yaml: str) -> None:
    bundle = load_bundle("---\n---\n# just a comment\n" + cp_yaml + "---\n")
    assert len(bundle.documents) == 2


def test_empty_text_is_an_empty_bundle() -> None:
    assert load_bundle("").documents == []


def test_defaults_are_filled_and_nulls_pruned_on_dump() -> None:
    text = f"apiVersion: {API}\nkind: LinkConfig\nname: eth0\nmtu: null\n"
    bundle = load_bundle(text)
    link = bundle.first(LinkConfig)
    assert link is not None
    assert (link.up, link.dhcp, link.addresses, link.mtu) == (True, False, [], None)
    assert bundle.to_raw() == [
        {"apiVersion": API, "kind": "LinkConfig", "name": "eth0", "up": True, "dhcp": False}
    ]


def test_kubernetes_version_gets_a_v_prefix() -> None:
    bundle = load_bundle(edited(lambda c: c["kubernetes"].update(version="1.30.0")))
    assert bundle.cluster.kubernetes.version == "v1.30.0"


def test_every_optional_document_kind_loads() -> None:
    text = inputs.dump(
        [
            {"apiVersion": API, "kind": "HostnameConfig", "hostname": "cp-1"},
            {
                "apiVersion": API,
                "kind": "LinkConfig",
                "name": "eth0",
                "addresses": ["192.0.2.5/24", "2001:db8::5/64"],
                "routes": [{"gateway": "192.0.2.1"}],
                "mtu": 9000,
            },
            {
                "apiVersion": API,
                "kind": "ResolverConfig",
                "nameservers": ["1.1.1.1"],
                "searchDomains": ["example.com"],
            },
            {"apiVersion": API, "kind": "TimeSyncConfig", "servers": ["time.example.com"]},
            {"apiVersion": API, "kind": "SysctlConfig", "sysctls": {"net.ipv4.ip_forward": "1"}},
            {
                "apiVersion": API,
                "kind": "KernelModuleConfig",
                "name": "br_netfilter",
                "parameters": ["a=1"],
            },
            {
                "apiVersion": API,
                "kind": "EtcFileConfig",
                "name": "cni/net.d/10.conf",
                "contents": "{}\n",
            },
            {
                "apiVersion": API,
                "kind": "EnvironmentConfig",
                "variables": {"HTTPS_PROXY": "http://proxy:3128"},
            },
            {
                "apiVersion": API,
                "kind": "LoggingConfig",
                "destinations": [{"endpoint": "tcp://198.51.100.7:5044"}],
            },
            {
                "apiVersion": API,
                "kind": "ImageVerificationConfig",
                "keys": [{"name": "release", "publicKey": ed25519_public_pem()}],
            },
        ]
    )
    bundle = load_bundle(text)
    assert len(bundle.documents) == 10
    assert load_bundle(bundle.to_yaml()).to_raw() == bundle.to_raw()


# -- YAML syntax -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "column", "reason"),
    [
        (f"apiVersion: {API}\nkind: MachineConfig\ntype: a: b\n", 3, 8, "mapping values"),
        ("kind: A\nlist: [1, 2\nx: 1\n", 3, 2, "expected ',' or ']'"),
        ("a:\n  b: 1\n c: 2\n", 3, 2, "did not find expected key"),
        ("x: *nope\n", 1, 4, "undefined alias"),
        ("kind: A\n\tx: 1\n", 2, 1, "tab"),
    ],
)
def test_yaml_syntax_error_names_source_line_and_column(
    text: str, line: int, column: int, reason: str
) -> None:
    with pytest.raises(ConfigSyntaxError) as caught:
        load_bundle(text, "cp.yaml")
    error = caught.value
    assert (error.source, error.line, error.column) == ("cp.yaml", line, column)
    assert str(error).startswith(f"cp.yaml:{line}:{column}: YAML syntax error: ")
    assert reason in str(error)
    assert error.hint


def test_yaml_syntax_error_without_source_says_input() -> None:
    with pytest.raises(ConfigSyntaxError, match=r"^<input>:1:4: "):
        load_bundle("x: *nope\n")


def test_duplicate_key_names_both_lines(cp_yaml: str) -> None:
    text = cp_yaml.replace(
        "  dnsDomain: cluster.local\n", "  dnsDomain: cluster.local\n  dnsDomain: other.local\n"
    )
    first = inputs.line_of(text, "dnsDomain")
    with pytest.raises(ConfigSyntaxError) as caught:
        load_bundle(text, "cp.yaml")
    error = caught.value
    assert (error.line, error.column) == (first + 1, 3)
    assert f"duplicate key 'dnsDomain' (first at line {first})" in str(error)
    assert error.hint is not None and "remove one" in error.hint


def test_duplicate_key_at_top_level() -> None:
    with pytest.raises(ConfigSyntaxError, match=r"a\.yaml:2:1: duplicate key 'kind'"):
        load_bundle("kind: LinkConfig\nkind: LinkConfig\n", "a.yaml")


def test_alias_bomb_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    with pytest.raises(ConfigSyntaxError, match="more than 100000 values"):
        load_bundle("\n".join(lines) + "\n", "bomb.yaml")


def test_unsafe_python_tags_are_a_syntax_error() -> None:
    with pytest.raises(ConfigSyntaxError, match=r"bad\.yaml:1:\d+: YAML syntax error"):
        load_bundle("kind: !!python/object/apply:os.system ['true']\n", "bad.yaml")


# -- document headers -------------------------------------------------------------------------


def test_unknown_kind_suggests_the_closest() -> None:
    problem = only_problem(f"apiVersion: {API}\nkind: MachinConfig\n")
    assert (problem.document, problem.path, problem.line) == ("document 1", "kind", 2)
    assert problem.message == "unknown kind 'MachinConfig'"
    assert problem.hint == "did you mean 'MachineConfig'?"
    assert problem.source == "cp.yaml"


def test_unknown_kind_far_from_any_lists_them_all() -> None:
    problem = only_problem(f"apiVersion: {API}\nkind: Pod\n")
    assert problem.hint is not None and problem.hint.startswith("one of: MachineConfig, ")


@pytest.mark.parametrize(
    "kind_line", ["", "kind: ''\n", "kind: 3\n", "kind: [a]\n", "kind: {a: 1}\n"]
)
def test_missing_or_odd_kind(kind_line: str) -> None:
    problem = only_problem(f"apiVersion: {API}\n{kind_line}name: x\n")
    assert (problem.where, problem.message) == ("document 1.kind", "missing or not a string")


def test_missing_api_version_names_the_kind_and_line() -> None:
    problem = only_problem("# a comment\nkind: MachineConfig\n")
    assert problem.where == "MachineConfig.apiVersion"
    assert problem.message == "missing"
    assert problem.hint == f"use apiVersion: {API}"
    assert problem.line == 2


def test_wrong_api_version() -> None:
    problem = only_problem("kind: LinkConfig\napiVersion: v1\nname: eth0\n")
    assert (problem.where, problem.line) == ("LinkConfig.apiVersion", 2)
    assert problem.message == "'v1' is not supported"


def test_missing_kind_and_api_version_are_two_problems_with_unhashable_kind() -> None:
    found = problems("kind: [1]\napiVersion: x\n")
    assert [p.where for p in found] == ["document 1.kind", "document 1.apiVersion"]


@pytest.mark.parametrize(
    ("body", "type_name"), [("- a\n- b\n", "list"), ("just text\n", "str"), ("42\n", "int")]
)
def test_document_that_is_not_a_mapping(body: str, type_name: str) -> None:
    problem = only_problem(f"---\n{body}")
    assert problem.document == "document 1"
    assert problem.message == f"must be a mapping, got {type_name}"
    assert problem.line == 2


def test_duplicate_singleton_document(cp_yaml: str) -> None:
    cluster = cp_yaml[cp_yaml.index("---\napiVersion: basalt.dev/v1alpha1\nkind: ClusterConfig") :]
    text = cp_yaml + cluster
    second = inputs.line_of(text, "kind: ClusterConfig", 2) - 1
    first = inputs.line_of(text, "kind: ClusterConfig") - 1
    problem = only_problem(text)
    assert problem.document == "ClusterConfig"
    assert problem.message == f"appears twice (first at line {first})"
    assert problem.line == second


def test_duplicate_named_document_but_different_names_are_fine() -> None:
    eth0 = f"---\napiVersion: {API}\nkind: LinkConfig\nname: eth0\n"
    eth1 = eth0.replace("eth0", "eth1")
    assert len(load_bundle(eth0 + eth1).documents) == 2
    problem = only_problem(eth0 + eth1 + eth0)
    assert (problem.where, problem.line) == ("LinkConfig(eth0)", 10)
    assert problem.message == "appears twice (first at line 2)"


def test_bundle_accessors_fail_clearly_when_a_document_is_missing() -> None:
    bundle = load_bundle(f"apiVersion: {API}\nkind: LinkConfig\nname: eth0\n", "links.yaml")
    with pytest.raises(ConfigValidationError, match="MachineConfig: document is missing"):
        _ = bundle.machine
    with pytest.raises(ConfigValidationError, match="ClusterConfig: document is missing"):
        _ = bundle.cluster


# -- unknown and missing fields -----------------------------------------------------------------


def test_unknown_field_gets_did_you_mean_with_path_and_line() -> None:
    def rename(cluster: dict[str, Any]) -> None:
        cluster["network"]["podSubnet"] = cluster["network"].pop("podSubnets")

    text = edited(rename)
    missing, unknown = problems(text)
    assert unknown.where == "ClusterConfig.network.podSubnet"
    assert unknown.message == "unknown field 'podSubnet'"
    assert unknown.hint == "did you mean 'podSubnets'?"
    assert unknown.line == inputs.line_of(text, "podSubnet:")
    # the renamed field is also missing under its real name; that is reported as well
    assert (missing.where, missing.message) == (
        "ClusterConfig.network.podSubnets",
        "required field is missing",
    )
    assert missing.line == inputs.line_of(text, "network:")


def test_unknown_field_without_a_close_match_lists_allowed_fields() -> None:
    problem = only_problem(edited(lambda c: c["network"].update(banana=1)))
    assert problem.hint == "allowed here: podSubnets, serviceSubnets, dnsDomain"


def test_unknown_field_in_a_list_item_model() -> None:
    text = (
        f"apiVersion: {API}\nkind: LinkConfig\nname: eth0\n"
        "routes:\n- gateway: 192.0.2.1\n  metrik: 5\n"
    )
    problem = only_problem(text)
    assert problem.where == "LinkConfig(eth0).routes[0].metrik"
    assert problem.hint == "did you mean 'metric'?"
    assert problem.line == 6


def test_unknown_top_level_field_in_a_document() -> None:
    problem = only_problem(edited(lambda m: m.update(tokn="x"), "MachineConfig"))
    assert (problem.where, problem.hint) == ("MachineConfig.tokn", "did you mean 'token'?")


def test_snake_case_field_name_hint_lists_the_camel_case_one() -> None:
    problem = only_problem(edited(lambda m: m.update(cert_sans=["a.example"]), "MachineConfig"))
    assert problem.hint is not None and "certSANs" in problem.hint


def test_missing_required_field() -> None:
    text = edited(lambda c: c["network"].pop("dnsDomain"))
    problem = only_problem(text)
    assert (problem.where, problem.message) == (
        "ClusterConfig.network.dnsDomain",
        "required field is missing",
    )
    assert problem.line == inputs.line_of(text, "network:")


@pytest.mark.parametrize(
    ("change", "path", "message"),
    [
        (lambda c: c["kubernetes"].update(version=1.31), "kubernetes.version", "must be a string"),
        (lambda c: c.update(network="x"), "network", "must be a mapping of fields"),
        (
            lambda c: c["network"].update(podSubnets="10.0.0.0/8"),
            "network.podSubnets",
            "must be a list",
        ),
        (lambda c: c["etcd"].update(extraArgs=["a"]), "etcd.extraArgs", "must be a mapping"),
    ],
)
def test_wrong_types_have_plain_messages(change: Any, path: str, message: str) -> None:
    problem = only_problem(edited(change))
    assert (problem.path, problem.message) == (path, message)
    assert problem.hint


def test_empty_pod_subnet_list_is_refused() -> None:
    problem = only_problem(edited(lambda c: c["network"].update(podSubnets=[])))
    assert problem.where == "ClusterConfig.network.podSubnets"


# -- validated scalars -------------------------------------------------------------------------


def test_bad_cidr_in_a_list_names_the_index_and_line() -> None:
    text = edited(lambda c: c["network"].update(podSubnets=["10.244.0.0/16", "10.300.0.0/16"]))
    problem = only_problem(text)
    assert problem.where == "ClusterConfig.network.podSubnets[1]"
    assert problem.message == "'10.300.0.0/16' is not a CIDR subnet"
    assert problem.line == inputs.line_of(text, "10.300.0.0/16")
    assert problem.render().startswith(f"cp.yaml:{problem.line}: error: ClusterConfig.network")


def test_cidr_with_host_bits_suggests_the_network() -> None:
    problem = only_problem(edited(lambda c: c["network"].update(serviceSubnets=["10.96.0.1/12"])))
    assert problem.message == "'10.96.0.1/12' has host bits set"
    assert problem.hint == "did you mean 10.96.0.0/12?"


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("http://192.0.2.10:6443", "is not an https URL"),
        ("https://192.0.2.10:99999", "has an invalid port"),
        ("https://192.0.2.10:0", "has an invalid port"),
        ("https://:6443", "has no host"),
        ("https://192.0.2.10:6443/api", "must not have a path, query or fragment"),
        ("https://192.0.2.10:6443?x=1", "must not have a path, query or fragment"),
        ("https://Bad_Host:6443", "is not a valid host name"),
        ("192.0.2.10:6443", "is not an https URL"),
    ],
)
def test_bad_endpoint_url(endpoint: str, message: str) -> None:
    problem = only_problem(edited(lambda c: c["controlPlane"].update(endpoint=endpoint)))
    assert problem.where == "ClusterConfig.controlPlane.endpoint"
    assert message in problem.message
    assert problem.hint


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://cp.example.com:6443",
        "https://[2001:db8::1]:6443",
        "https://192.0.2.10",
        "https://cp.example.com/",
    ],
)
def test_good_endpoint_urls(endpoint: str) -> None:
    load_bundle(edited(lambda c: c["controlPlane"].update(endpoint=endpoint)))


@pytest.mark.parametrize(
    "domain", ["Cluster.Local", "bad_domain", "-x.local", "a..b", "", "x" * 64 + ".local"]
)
def test_bad_hostname(domain: str) -> None:
    problem = only_problem(edited(lambda c: c["network"].update(dnsDomain=domain)))
    assert problem.where == "ClusterConfig.network.dnsDomain"
    assert problem.message == f"{domain!r} is not a valid host name"


def test_bad_cert_san_is_neither_host_nor_ip() -> None:
    problem = only_problem(
        edited(lambda m: m.update(certSANs=["ok.example.com", "not a host"]), "MachineConfig")
    )
    assert problem.where == "MachineConfig.certSANs[1]"


@pytest.mark.parametrize(
    "token",
    ["abc.def", "ABCDEF.0123456789abcdef", "abcdef0123456789abcdef", "abcdef.0123456789abcdeg_"],
)
def test_bad_token(token: str) -> None:
    problem = only_problem(edited(lambda m: m.update(token=token), "MachineConfig"))
    assert problem.where == "MachineConfig.token"
    assert "token must look like" in problem.message
    assert problem.hint is not None and "gen secrets" in problem.hint


@pytest.mark.parametrize(
    ("secret", "message"),
    [("not base64!", "not valid base64"), ("c2hvcnQ=", "decodes to 5 bytes, want 32")],
)
def test_bad_secret(secret: str, message: str) -> None:
    problem = only_problem(edited(lambda c: c.update(secret=secret)))
    assert (problem.where, problem.message) == ("ClusterConfig.secret", message)


def test_bad_bootstrap_token_and_secretbox_secret() -> None:
    def change(cluster: dict[str, Any]) -> None:
        cluster["kubernetes"]["bootstrapToken"] = "nope"
        cluster["kubernetes"]["secretboxEncryptionSecret"] = "AAAA"

    found = problems(edited(change))
    assert [p.where for p in found] == [
        "ClusterConfig.kubernetes.bootstrapToken",
        "ClusterConfig.kubernetes.secretboxEncryptionSecret",
    ]


@pytest.mark.parametrize(
    ("crt", "message"),
    [
        ("hello", "not a PEM certificate (no BEGIN CERTIFICATE line)"),
        (
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "certificate does not parse",
        ),
    ],
)
def test_certificate_that_does_not_parse(crt: str, message: str) -> None:
    text = edited(lambda c: c["kubernetes"]["ca"].update(crt=crt))
    problem = only_problem(text)
    assert problem.where == "ClusterConfig.kubernetes.ca"
    assert message in problem.message
    assert problem.hint == "paste the whole PEM block, BEGIN and END lines included"
    assert problem.line == inputs.line_of(text, "  ca:", 2)


def test_truncated_certificate_does_not_parse(cp_yaml: str) -> None:
    documents = inputs.controlplane_raw()
    machine = inputs.find(documents, "MachineConfig")
    lines = machine["ca"]["crt"].splitlines()
    machine["ca"]["crt"] = "\n".join([*lines[:3], lines[-1]]) + "\n"
    problem = only_problem(inputs.dump(documents))
    assert problem.where == "MachineConfig.ca"
    assert "does not parse" in problem.message


def test_key_that_does_not_match_the_certificate() -> None:
    other = inputs.other_secrets().certs.kubernetes.key
    problem = only_problem(edited(lambda c: c["kubernetes"]["ca"].update(key=other)))
    assert problem.where == "ClusterConfig.kubernetes.ca"
    assert problem.message == "the private key does not belong to the certificate"
    assert problem.hint == "take crt and key from the same secrets bundle"


def test_key_that_is_not_a_key() -> None:
    problem = only_problem(edited(lambda c: c["etcd"]["ca"].update(key="secret"), "ClusterConfig"))
    assert problem.where == "ClusterConfig.etcd.ca"
    assert "not a PEM private key" in problem.message


def test_service_account_key_that_does_not_parse() -> None:
    bad = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    problem = only_problem(edited(lambda c: c["kubernetes"]["serviceAccountKey"].update(key=bad)))
    assert problem.where == "ClusterConfig.kubernetes.serviceAccountKey.key"
    assert "private key does not parse" in problem.message


@pytest.mark.parametrize(
    ("document", "path", "message"),
    [
        (
            {"kind": "LinkConfig", "name": "eth0", "addresses": ["192.0.2.5"]},
            "addresses[0]",
            "has no prefix length",
        ),
        (
            {"kind": "LinkConfig", "name": "eth0", "addresses": ["192.0.2.500/24"]},
            "addresses[0]",
            "is not an IP address with a prefix length",
        ),
        (
            {"kind": "LinkConfig", "name": "eth0", "routes": [{"gateway": "gw"}]},
            "routes[0].gateway",
            "is not an IP address",
        ),
        ({"kind": "LinkConfig", "name": "eth0", "mtu": 10}, "mtu", "must be at least 68"),
        ({"kind": "LinkConfig", "name": "a-very-long-link-name"}, "name", "at most 15"),
        (
            {"kind": "ResolverConfig", "nameservers": ["1.1.1.1", "1.0.0.1", "8.8.8.8", "9.9.9.9"]},
            "nameservers",
            "at most 3",
        ),
        (
            {"kind": "SysctlConfig", "sysctls": {"Not A Sysctl": "1"}},
            '["Not A Sysctl"]',
            "is not a sysctl name",
        ),
        (
            {"kind": "KernelModuleConfig", "name": "bad module"},
            "name",
            "is not a kernel module name",
        ),
        (
            {"kind": "EtcFileConfig", "name": "/etc/passwd", "contents": ""},
            "name",
            "is not a normalised path relative to /etc",
        ),
        (
            {"kind": "EtcFileConfig", "name": "a/../../b", "contents": ""},
            "name",
            "is not a normalised path",
        ),
        (
            {"kind": "EtcFileConfig", "name": "hostname", "contents": ""},
            "name",
            "is generated by Basalt",
        ),
        (
            {"kind": "EnvironmentConfig", "variables": {"1BAD": "x"}},
            '["1BAD"]',
            "is not an environment variable name",
        ),
        (
            {"kind": "LoggingConfig", "destinations": [{"endpoint": "ftp://x"}]},
            "destinations[0].endpoint",
            "is not a URL with a scheme and host",
        ),
        (
            {"kind": "LoggingConfig", "destinations": [{"endpoint": "tcp://x:99999"}]},
            "destinations[0].endpoint",
            "has an invalid port",
        ),
        ({"kind": "HostnameConfig"}, "", "set either hostname or auto: stable"),
        (
            {"kind": "HostnameConfig", "hostname": "a", "auto": "stable"},
            "",
            "hostname and auto: stable exclude each other",
        ),
        (
            {"kind": "ImageVerificationConfig", "keys": [{"name": "k", "publicKey": "x"}]},
            "keys[0].publicKey",
            "public key does not parse",
        ),
        (
            {"kind": "TimeSyncConfig", "bootTimeoutSeconds": -1},
            "bootTimeoutSeconds",
            "must be at least 0",
        ),
    ],
)
def test_bad_values_in_other_documents(document: dict[str, Any], path: str, message: str) -> None:
    problem = only_problem(inputs.dump([{"apiVersion": API, **document}]))
    assert problem.path.endswith(path)
    assert message in problem.message


def test_sysctl_key_problem_quotes_the_key_in_the_path() -> None:
    text = f"apiVersion: {API}\nkind: SysctlConfig\nsysctls:\n  Not A Sysctl: '1'\n"
    problem = only_problem(text)
    assert problem.where == 'SysctlConfig.sysctls["Not A Sysctl"]'
    assert problem.line == 4


def test_install_disk_must_be_a_device() -> None:
    def change(machine: dict[str, Any]) -> None:
        machine["install"]["disk"] = "/var/disk.img"
        machine["install"]["extraKernelArgs"] = [
            "console=ttyS0",
            "two args",
            "basalt.slot=B",
            "basalt.entry=basalt-1-a-0.1.0.conf",
        ]

    found = problems(edited(change, "MachineConfig"))
    assert [(p.where, p.message) for p in found] == [
        ("MachineConfig.install.disk", "'/var/disk.img' is not a device path"),
        ("MachineConfig.install.extraKernelArgs[1]", "'two args' is not one kernel argument"),
        (
            "MachineConfig.install.extraKernelArgs[2]",
            "'basalt.slot=B' is set by the image's boot path",
        ),
        (
            "MachineConfig.install.extraKernelArgs[3]",
            "'basalt.entry=basalt-1-a-0.1.0.conf' is set by the image's boot path",
        ),
    ]
    assert "basalt.slot" in (found[2].hint or "")


# -- all problems at once -----------------------------------------------------------------------


def test_three_independent_mistakes_are_three_problems() -> None:
    documents = inputs.controlplane_raw()
    machine = inputs.find(documents, "MachineConfig")
    cluster = inputs.find(documents, "ClusterConfig")
    machine["instal"] = machine.pop("install")
    cluster["network"]["podSubnets"] = ["10.244.0.0/16", "10.244.0.0/33"]
    cluster["controlPlane"]["endpoint"] = "http://cp:6443"
    text = inputs.dump(documents)
    with pytest.raises(ConfigValidationError) as caught:
        load_bundle(text, "cp.yaml")
    error = caught.value
    wheres = [p.where for p in error.problems]
    assert "MachineConfig.instal" in wheres
    assert "ClusterConfig.network.podSubnets[1]" in wheres
    assert "ClusterConfig.controlPlane.endpoint" in wheres
    assert all(p.line is not None and p.source == "cp.yaml" for p in error.problems)
    rendered = error.render()
    assert f"cp.yaml: {len(error.errors)} errors found" in rendered
    for problem in error.problems:
        assert problem.render() in rendered


def test_problems_in_several_documents_are_all_reported() -> None:
    text = inputs.dump(
        [
            {"apiVersion": API, "kind": "LinkConfig", "name": "eth0", "mtu": 1},
            {"kind": "ResolverConfig"},
            {"apiVersion": API, "kind": "Nope"},
            {"apiVersion": API, "kind": "SysctlConfig", "sysctls": {"bad": "1"}},
        ]
    )
    found = problems(text)
    assert [p.where for p in found] == [
        "LinkConfig(eth0).mtu",
        "ResolverConfig.apiVersion",
        "document 3.kind",
        "SysctlConfig.sysctls.bad",
    ]
    assert [p.line for p in found] == [
        inputs.line_of(text, "mtu: 1"),
        inputs.line_of(text, "kind: ResolverConfig"),
        inputs.line_of(text, "kind: Nope"),
        inputs.line_of(text, "bad:"),
    ]


# -- from data ---------------------------------------------------------------------------------


def test_bundle_from_raw_reports_problems_without_lines() -> None:
    documents = inputs.controlplane_raw()
    inputs.find(documents, "ClusterConfig")["name"] = "Bad Name"
    with pytest.raises(ConfigValidationError) as caught:
        bundle_from_raw(documents, source="controlplane.yaml")
    (problem,) = caught.value.problems
    assert problem.where == "ClusterConfig.name"
    assert problem.line is None
    assert problem.source == "controlplane.yaml"


def test_bundle_problem_points_at_lines_when_loaded_from_text(cp_yaml: str) -> None:
    bundle = load_bundle(cp_yaml, "cp.yaml")
    problem = bundle.problem(bundle.cluster, ("network", "serviceSubnets", 0), "x")
    assert problem.line == inputs.line_of(cp_yaml, "10.96.0.0/12")
    assert problem.where == "ClusterConfig.network.serviceSubnets[0]"
    unplaced = ConfigBundle(bundle.documents).problem(bundle.cluster, ("name",), "x")
    assert unplaced.line is None
    assert bundle.problem("ClusterConfig", (), "x").where == "ClusterConfig"


# -- hostile or odd YAML (regressions found by the fuzz tests) -------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "!!int",
        "!!float",
        "!!bool maybe",
        "!!timestamp noon",
        "!!int 0x",
        "!!timestamp 0000-01-01",
        "!!int _",
    ],
)
def test_explicit_tag_that_cannot_convert_is_a_syntax_error_with_a_line(value: str) -> None:
    text = f"apiVersion: {API}\nkind: LinkConfig\nname: eth0\n---\nkind: LinkConfig\nmtu: {value}\n"
    with pytest.raises(ConfigSyntaxError) as caught:
        load_bundle(text, "odd.yaml")
    assert (caught.value.source, caught.value.line) == ("odd.yaml", 5)
    assert "YAML value cannot be converted" in str(caught.value)
    assert caught.value.hint is not None and "!!int" in caught.value.hint


def test_a_key_spelled_like_the_pydantic_key_marker() -> None:
    problem = only_problem(f"apiVersion: {API}\nkind: LinkConfig\nname: eth0\n'[key]': 1\n")
    assert problem.where == 'LinkConfig(eth0)["[key]"]'
    assert problem.message == "unknown field '[key]'"
    assert problem.line == 4
    problem = only_problem(f"apiVersion: {API}\nkind: SysctlConfig\nsysctls:\n  '[key]': '1'\n")
    assert problem.where == 'SysctlConfig.sysctls["[key]"]'
    assert problem.message == "'[key]' is not a sysctl name"


@pytest.mark.parametrize("depth", [101, 5000])
def test_absurdly_deep_nesting_is_refused(depth: int) -> None:
    text = f"apiVersion: {API}\nkind: LinkConfig\nname: eth0\nroutes: {'[' * depth}{']' * depth}\n"
    with pytest.raises(ConfigSyntaxError) as caught:
        load_bundle(text, "deep.yaml")
    assert caught.value.line == 4
    assert "nested more than 100 levels deep" in str(caught.value)


def test_nesting_below_the_limit_is_only_a_type_problem() -> None:
    text = f"apiVersion: {API}\nkind: LinkConfig\nname: eth0\nroutes: [{'[' * 90}{']' * 90}]\n"
    assert only_problem(text).where == "LinkConfig(eth0).routes[0]"


def test_self_referencing_alias_is_refused() -> None:
    with pytest.raises(ConfigSyntaxError, match="nested more than 100 levels"):
        load_bundle("kind: &a [*a]\n", "loop.yaml")


@pytest.mark.parametrize(
    "contents",
    [
        "\x85",
        "a\x85b\n",
        "line\n\x85next\n",
        "a\u2028b",
        "tab\there\n",
        "trailing \nspace\n",
        "\n",
        "",
        "  indented\nfirst\n",
        "no newline at end",
        "#!/bin/sh\necho hi\n",
        "\x0b\x0c",
    ],
)
def test_awkward_strings_survive_dump_and_load(contents: str) -> None:
    document = {"apiVersion": API, "kind": "EtcFileConfig", "name": "x.conf", "contents": contents}
    bundle = load_bundle(inputs.dump([document]))
    assert bundle.to_raw()[0]["contents"] == contents
    text = bundle.to_yaml()
    assert load_bundle(text).to_raw() == bundle.to_raw()
    assert load_bundle(text).to_yaml() == text
