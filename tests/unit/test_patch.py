"""Config patches: strategic merge, RFC 6902 JSON patch, loading, and their errors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from basalt.machinery.config import (
    JSONPatch,
    MergePatch,
    Mode,
    apply_patches,
    bundle_from_raw,
    load_patch,
    parse_patch,
    patch_and_check,
)
from basalt.machinery.errors import ConfigSyntaxError, ConfigValidationError, PatchError
from tests.fakes import inputs

API = inputs.API


def patched(*texts: str, documents: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    base = inputs.controlplane_raw() if documents is None else documents
    return apply_patches(base, inputs.patches(*texts), target="controlplane.yaml")


def patch_error(*texts: str, documents: list[dict[str, Any]] | None = None) -> PatchError:
    with pytest.raises(PatchError) as caught:
        patched(*texts, documents=documents)
    return caught.value


def link(name: str = "eth0", **fields: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "LinkConfig", "name": name, **fields}


# -- parsing ---------------------------------------------------------------------------------


def test_a_list_is_a_json_patch_and_mappings_are_a_merge_patch() -> None:
    json_patch = parse_patch("- op: remove\n  path: /mtu\n", "p.json")
    assert isinstance(json_patch, JSONPatch)
    assert (json_patch.source, json_patch.line) == ("p.json", 1)
    assert json_patch.operations == [{"op": "remove", "path": "/mtu"}]
    merge = parse_patch("kind: LinkConfig\nname: eth0\n---\nkind: ClusterConfig\n", "p.yaml")
    assert isinstance(merge, MergePatch)
    assert [d.data["kind"] for d in merge.documents] == ["LinkConfig", "ClusterConfig"]


def test_json_syntax_is_yaml_too() -> None:
    patch = parse_patch('[{"op": "add", "path": "/mtu", "value": 1500}]', "p.json")
    assert isinstance(patch, JSONPatch)


def test_empty_patch_is_refused() -> None:
    with pytest.raises(PatchError, match=r"^empty\.yaml: the patch is empty$"):
        parse_patch("# nothing here\n", "empty.yaml")


def test_yaml_syntax_error_in_a_patch_names_file_and_line() -> None:
    with pytest.raises(ConfigSyntaxError) as caught:
        parse_patch("kind: ClusterConfig\nnetwork:\n  dnsDomain: [x\n", "net.yaml")
    assert caught.value.source == "net.yaml"
    assert caught.value.line == 4
    assert str(caught.value).startswith("net.yaml:4:")


def test_duplicate_key_in_a_patch_names_file_and_line() -> None:
    with pytest.raises(ConfigSyntaxError, match=r"^p\.yaml:3:1: duplicate key 'kind'"):
        parse_patch("kind: ClusterConfig\nname: x\nkind: MachineConfig\n", "p.yaml")


def test_load_patch_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "net.yaml").write_text("kind: ClusterConfig\nnetwork: {dnsDomain: a.local}\n")
    patch = load_patch(f"@{tmp_path / 'net.yaml'}")
    assert isinstance(patch, MergePatch)
    assert patch.source == str(tmp_path / "net.yaml")


def test_load_patch_relative_to_a_base_dir(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("kind: ClusterConfig\n")
    patch = load_patch("@p.yaml", base_dir=tmp_path)
    assert patch.source == str(tmp_path / "p.yaml")


def test_inline_patch_is_labelled_by_its_index() -> None:
    patch = load_patch("kind: ClusterConfig\nname: x\n", index=3)
    assert patch.source == "<inline patch 3>"
    with pytest.raises(ConfigSyntaxError, match=r"^<inline patch 2>:1:"):
        load_patch("kind: a: b", index=2)


def test_missing_patch_file(tmp_path: Path) -> None:
    with pytest.raises(PatchError) as caught:
        load_patch(f"@{tmp_path / 'nope.yaml'}")
    assert str(caught.value) == f"patch file {tmp_path / 'nope.yaml'} does not exist"
    assert caught.value.hint is not None and "@patch.yaml" in caught.value.hint


def test_unreadable_patch_files(tmp_path: Path) -> None:
    with pytest.raises(PatchError, match="cannot be read"):
        load_patch(f"@{tmp_path}")
    (tmp_path / "latin1.yaml").write_bytes(b"kind: \xe9\n")
    with pytest.raises(PatchError, match="cannot be read"):
        load_patch(f"@{tmp_path / 'latin1.yaml'}")


# -- strategic merge ----------------------------------------------------------------------------


def test_merge_matches_a_singleton_by_kind_and_merges_maps() -> None:
    result = patched("kind: ClusterConfig\nnetwork:\n  dnsDomain: example.internal\n")
    network = inputs.find(result, "ClusterConfig")["network"]
    assert network == {
        "podSubnets": ["10.244.0.0/16"],
        "serviceSubnets": ["10.96.0.0/12"],
        "dnsDomain": "example.internal",
    }
    assert len(result) == 2


def test_nested_maps_merge_key_by_key() -> None:
    result = patched(
        "kind: MachineConfig\nkubelet:\n  extraArgs:\n    a: '1'\n",
        "kind: MachineConfig\nkubelet:\n  extraArgs:\n    b: '2'\n",
    )
    kubelet = inputs.find(result, "MachineConfig")["kubelet"]
    assert kubelet == {"image": "basalt/kubelet:v1.34.1", "extraArgs": {"a": "1", "b": "2"}}


def test_lists_append_without_repeating_items() -> None:
    base = inputs.generate(additional_sans=("a.example.com",)).controlplane.to_raw()
    text = "kind: MachineConfig\ncertSANs: [a.example.com, b.example.com]\n"
    result = patched(text, text, documents=base)
    assert inputs.find(result, "MachineConfig")["certSANs"] == ["a.example.com", "b.example.com"]


def test_list_appended_to_a_missing_field_is_added() -> None:
    result = patched("kind: MachineConfig\ncertSANs: [10.0.0.1]\n")
    assert inputs.find(result, "MachineConfig")["certSANs"] == ["10.0.0.1"]


def test_replace_on_merge_fields_are_replaced() -> None:
    result = patched(
        "kind: ClusterConfig\nnetwork:\n  podSubnets: [10.0.0.0/16, 10.1.0.0/16]\n"
        "  serviceSubnets: [10.2.0.0/16]\n"
    )
    network = inputs.find(result, "ClusterConfig")["network"]
    assert network["podSubnets"] == ["10.0.0.0/16", "10.1.0.0/16"]
    assert network["serviceSubnets"] == ["10.2.0.0/16"]
    bundle_from_raw(result)


def test_replace_on_merge_in_nested_models_and_named_documents() -> None:
    base = [
        *inputs.controlplane_raw(),
        link(addresses=["192.0.2.5/24"], routes=[{"gateway": "192.0.2.1"}]),
    ]
    result = patched(
        "kind: MachineConfig\nkubelet: {nodeIP: {validSubnets: [10.0.0.0/8]}}\n",
        "kind: MachineConfig\nkubelet: {nodeIP: {validSubnets: [192.168.0.0/16]}}\n",
        "kind: LinkConfig\nname: eth0\naddresses: [198.51.100.5/24]\n"
        "routes: [{network: 10.0.0.0/8, gateway: 192.0.2.254}]\n",
        documents=base,
    )
    kubelet = inputs.find(result, "MachineConfig")["kubelet"]
    assert kubelet["nodeIP"]["validSubnets"] == ["192.168.0.0/16"]
    eth0 = inputs.find(result, "LinkConfig", "eth0")
    assert eth0["addresses"] == ["198.51.100.5/24"]
    assert eth0["routes"] == [
        {"gateway": "192.0.2.1"},
        {"network": "10.0.0.0/8", "gateway": "192.0.2.254"},
    ]


def test_delete_directive_removes_a_key() -> None:
    result = patched("kind: MachineConfig\ninstall:\n  disk:\n    $patch: delete\n")
    assert inputs.find(result, "MachineConfig")["install"] == {
        "image": "basalt/installer:v0.1.0",
        "wipe": False,
    }


def test_delete_directive_on_a_missing_key_is_a_no_op() -> None:
    result = patched("kind: MachineConfig\ncertSANs: {$patch: delete}\n")
    assert result == inputs.controlplane_raw()


def test_delete_directive_removes_a_whole_document() -> None:
    base = [*inputs.controlplane_raw(), link("eth0"), link("eth1")]
    result = patched("kind: LinkConfig\nname: eth0\n$patch: delete\n", documents=base)
    assert [d.get("name") for d in result if d["kind"] == "LinkConfig"] == ["eth1"]
    result = patched("kind: ClusterConfig\n$patch: delete\n")
    assert [d["kind"] for d in result] == ["MachineConfig"]


def test_replace_directive_replaces_a_map_whole() -> None:
    result = patched(
        "kind: MachineConfig\nkubelet:\n  extraArgs: {a: '1', b: '2'}\n",
        "kind: MachineConfig\nkubelet:\n  extraArgs:\n    $patch: replace\n    c: '3'\n",
    )
    assert inputs.find(result, "MachineConfig")["kubelet"]["extraArgs"] == {"c": "3"}
    result = patched("kind: MachineConfig\ninstall:\n  $patch: replace\n  image: mine:1\n")
    assert inputs.find(result, "MachineConfig")["install"] == {"image": "mine:1"}


def test_new_named_documents_are_added_with_api_version() -> None:
    result = patched(
        "kind: LinkConfig\nname: eth0\naddresses: [192.0.2.5/24]\n",
        "kind: LinkConfig\nname: eth1\ndhcp: true\n",
        "kind: LinkConfig\nname: eth0\nmtu: 9000\n",
    )
    assert [d["kind"] for d in result] == [
        "MachineConfig",
        "ClusterConfig",
        "LinkConfig",
        "LinkConfig",
    ]
    assert inputs.find(result, "LinkConfig", "eth0") == link(addresses=["192.0.2.5/24"], mtu=9000)
    assert inputs.find(result, "LinkConfig", "eth1") == link("eth1", dhcp=True)
    bundle_from_raw(result)


def test_new_singleton_document_is_added_and_directives_are_stripped() -> None:
    result = patched(
        "kind: ResolverConfig\nnameservers: [1.1.1.1]\nsearchDomains: {$patch: delete}\n"
        "extra:\n  $patch: replace\n  a: 1\n"
    )
    assert result[-1] == {
        "apiVersion": API,
        "kind": "ResolverConfig",
        "nameservers": ["1.1.1.1"],
        "extra": {"a": 1},
    }


def test_merge_replaces_a_scalar_with_a_different_shape() -> None:
    result = patched("kind: MachineConfig\ntoken: {a: 1}\n")
    assert inputs.find(result, "MachineConfig")["token"] == {"a": 1}


def test_later_patches_win() -> None:
    result = patched("kind: ClusterConfig\nname: one\n", "kind: ClusterConfig\nname: two\n")
    assert inputs.find(result, "ClusterConfig")["name"] == "two"


def test_a_patch_with_the_right_api_version_is_accepted() -> None:
    result = patched(f"apiVersion: {API}\nkind: ClusterConfig\nname: x\n")
    assert inputs.find(result, "ClusterConfig")["name"] == "x"


# -- strategic merge errors ----------------------------------------------------------------------


def test_unknown_kind_names_patch_document_and_line() -> None:
    error = patch_error("kind: ClusterConfig\nname: x\n---\n# eth\nkind: LinkConfg\nname: eth0\n")
    assert str(error) == "patch-1.yaml: document 2 (line 5): unknown kind 'LinkConfg'"
    assert error.hint == "did you mean 'LinkConfig'?"


def test_unknown_kind_far_from_any_lists_kinds() -> None:
    error = patch_error("kind: Deployment\n")
    assert error.hint is not None and error.hint.startswith("one of: MachineConfig")


@pytest.mark.parametrize("text", ["name: x\n", "kind: [a]\n", "kind: 7\n"])
def test_missing_or_odd_kind_in_a_patch(text: str) -> None:
    error = patch_error(text)
    assert str(error).startswith("patch-1.yaml: document 1 (line 1): ")
    assert "kind" in str(error)


def test_wrong_api_version_in_a_patch() -> None:
    error = patch_error("kind: ClusterConfig\napiVersion: v2\n")
    assert str(error) == "patch-1.yaml: document 1 (line 2): apiVersion 'v2' is not supported"


def test_named_kind_patch_needs_a_name() -> None:
    error = patch_error("kind: LinkConfig\nmtu: 1500\n")
    assert "LinkConfig patches must say which document: name: ..." in str(error)


def test_deleting_a_document_that_is_not_there() -> None:
    error = patch_error("kind: LinkConfig\nname: eth9\n$patch: delete\n")
    assert str(error) == "patch-1.yaml: document 1 (line 3): nothing to delete: no LinkConfig(eth9)"


def test_unknown_document_directive() -> None:
    error = patch_error("kind: ClusterConfig\n$patch: replace\n")
    assert "unknown directive 'replace'" in str(error)
    assert error.hint == "documents take only '$patch: delete'"


def test_unknown_field_directive_names_its_line() -> None:
    error = patch_error("kind: MachineConfig\ninstall:\n  disk:\n    $patch: nuke\n")
    assert str(error) == "patch-1.yaml: document 1 (line 4): unknown directive 'nuke'"
    error = patch_error("kind: MachineConfig\nkubelet:\n  $patch: nuke\n")
    assert "unknown directive 'nuke'" in str(error)


def test_unknown_directive_in_added_content() -> None:
    error = patch_error("kind: LinkConfig\nname: eth0\nroutes:\n- $patch: merge\n  gateway: x\n")
    assert "unknown directive 'merge'" in str(error)
    assert "(line 4)" in str(error)


def test_delete_directive_takes_no_other_keys() -> None:
    error = patch_error("kind: MachineConfig\ninstall:\n  $patch: delete\n  disk: /dev/sda\n")
    assert str(error) == ("patch-1.yaml: document 1 (line 2): '$patch: delete' takes no other keys")


def test_merge_patch_document_that_is_not_a_mapping() -> None:
    error = patch_error("kind: ClusterConfig\n---\n- a\n- b\n")
    assert str(error) == (
        "patch-1.yaml: document 2 (line 3): must be a mapping with apiVersion and kind"
    )
    assert error.hint is not None and "JSON patch" in error.hint


# -- JSON patch -----------------------------------------------------------------------------------


def json_patch(text: str) -> JSONPatch:
    patch = parse_patch(text, "ops.yaml")
    assert isinstance(patch, JSONPatch)
    return patch


def test_json_patch_on_a_single_document_target() -> None:
    patch = json_patch(
        "- {op: replace, path: /mtu, value: 9000}\n"
        "- {op: add, path: /addresses, value: [192.0.2.5/24]}\n"
        "- {op: add, path: /addresses/-, value: 192.0.2.6/24}\n"
        "- {op: copy, from: /name, path: /alias}\n"
        "- {op: move, from: /alias, path: /alias2}\n"
        "- {op: remove, path: /alias2}\n"
        "- {op: test, path: /name, value: eth0}\n"
    )
    base = [link(mtu=1500)]
    result = apply_patches(base, [patch], target="eth0.yaml")
    assert result == [link(mtu=9000, addresses=["192.0.2.5/24", "192.0.2.6/24"])]
    bundle_from_raw(result)


def test_json_patch_is_refused_on_multi_document_targets() -> None:
    patch = json_patch("- {op: replace, path: /name, value: x}\n")
    with pytest.raises(PatchError) as caught:
        apply_patches(inputs.controlplane_raw(), [patch], target="controlplane.yaml")
    assert str(caught.value) == (
        "ops.yaml: JSON patches apply to single-document configs; controlplane.yaml has 2 documents"
    )
    assert caught.value.hint is not None and "strategic merge patch" in caught.value.hint


def test_json_patch_refused_on_an_empty_target() -> None:
    with pytest.raises(PatchError, match="has 0 documents"):
        apply_patches([], [json_patch("- {op: add, path: /a, value: 1}\n")])


@pytest.mark.parametrize(
    ("operation", "label"),
    [
        ("{op: remove, path: /nope}", "operation 2 (remove /nope)"),
        ("{op: replace, path: /a/b/c, value: 1}", "operation 2 (replace /a/b/c)"),
        ("{op: test, path: /name, value: eth1}", "operation 2 (test /name)"),
        ("{op: move, from: /nope, path: /x}", "operation 2 (move /x)"),
        ("{op: add, path: nope, value: 1}", "operation 2 (add nope)"),
        ("{op: frobnicate, path: /mtu}", "operation 2 (frobnicate /mtu)"),
        ("{path: /mtu}", "operation 2 (None /mtu)"),
        ("{op: add, path: /mtu}", "operation 2 (add /mtu)"),
        ("{op: add, path: 5, value: 1}", "operation 2 (add 5)"),
        ("{op: add, path: /routes/7, value: 1}", "operation 2 (add /routes/7)"),
        ("just text", "operation 2"),
    ],
)
def test_failing_json_operation_is_named(operation: str, label: str) -> None:
    patch = json_patch(f"- {{op: add, path: /routes, value: []}}\n- {operation}\n")
    with pytest.raises(PatchError) as caught:
        apply_patches([link()], [patch])
    assert str(caught.value).startswith(f"ops.yaml: {label}: ")
    assert caught.value.hint is not None and "JSON pointers" in caught.value.hint


def test_json_patch_must_leave_a_mapping() -> None:
    with pytest.raises(PatchError, match="the patched document is not a mapping any more"):
        apply_patches([link()], [json_patch("- {op: replace, path: '', value: [1]}\n")])


def test_json_patch_then_merge_patch() -> None:
    patches = [
        json_patch("- {op: add, path: /mtu, value: 1400}\n"),
        parse_patch("kind: LinkConfig\nname: eth0\ndhcp: true\n", "m.yaml"),
    ]
    assert apply_patches([link()], patches) == [link(mtu=1400, dhcp=True)]


# -- patches never change their input ---------------------------------------------------------


def test_merge_patches_do_not_mutate_documents_or_patches() -> None:
    base = [*inputs.controlplane_raw(), link(routes=[{"gateway": "192.0.2.1"}])]
    before = copy.deepcopy(base)
    patches = inputs.patches(
        "kind: MachineConfig\nkubelet: {extraArgs: {a: '1'}}\ncertSANs: [x.example]\n",
        "kind: LinkConfig\nname: eth0\nroutes: [{gateway: 192.0.2.9}]\n",
        "kind: LinkConfig\nname: eth1\nroutes: [{gateway: 192.0.2.9}]\n",
        "kind: ClusterConfig\nnetwork: {podSubnets: [10.0.0.0/16]}\n",
        "kind: MachineConfig\ninstall: {$patch: replace, image: x}\n",
    )
    patch_data = copy.deepcopy(
        [[d.data for d in p.documents] for p in patches if isinstance(p, MergePatch)]
    )
    result = apply_patches(base, patches)
    assert base == before
    assert [[d.data for d in p.documents] for p in patches if isinstance(p, MergePatch)] == (
        patch_data
    )
    # the result shares no containers with the patches either
    inputs.find(result, "LinkConfig", "eth1")["routes"][0]["gateway"] = "changed"
    assert [[d.data for d in p.documents] for p in patches if isinstance(p, MergePatch)] == (
        patch_data
    )


def test_json_patches_do_not_mutate_documents_or_patches() -> None:
    base = [link(routes=[{"gateway": "192.0.2.1"}])]
    before = copy.deepcopy(base)
    patch = json_patch(
        "- {op: add, path: /routes/0/metric, value: 5}\n"
        "- {op: add, path: /extra, value: {a: [1]}}\n"
    )
    operations = copy.deepcopy(patch.operations)
    result = apply_patches(base, [patch])
    assert base == before
    result[0]["extra"]["a"].append(2)
    assert patch.operations == operations


def test_failed_patch_leaves_input_untouched() -> None:
    base = inputs.controlplane_raw()
    before = copy.deepcopy(base)
    with pytest.raises(PatchError):
        apply_patches(
            base,
            inputs.patches(
                "kind: ClusterConfig\nname: x\n", "kind: LinkConfig\nname: eth0\n$patch: delete\n"
            ),
        )
    assert base == before


def test_json_patch_key_with_a_non_ascii_digit() -> None:
    # '²'.isdigit() is True but int('²') fails; the key is an ordinary map key
    base = [{"apiVersion": API, "kind": "EnvironmentConfig", "variables": {}}]
    patch = json_patch("- {op: add, path: /variables/², value: x}\n")
    assert apply_patches(base, [patch])[0]["variables"] == {"²": "x"}


def test_deeply_nested_patches_are_refused_when_parsed() -> None:
    deep = "{a: " * 600 + "1" + "}" * 600
    with pytest.raises(ConfigSyntaxError, match=r"^p\.yaml:3:\d+: values are nested more than"):
        parse_patch(f"kind: LinkConfig\nname: eth0\nroutes: {deep}\n", "p.yaml")
    with pytest.raises(ConfigSyntaxError, match="nested more than"):
        parse_patch(f"- {{op: add, path: /x, value: {deep}}}\n", "p.yaml")


def test_patches_nested_up_to_the_limit_apply_without_recursion_errors() -> None:
    deep = "{a: " * 95 + "1" + "}" * 95
    merge = parse_patch(f"kind: LinkConfig\nname: eth0\nroutes: [{deep}]\n", "m.yaml")
    ops = parse_patch(
        f"- {{op: add, path: /x, value: {deep}}}\n- {{op: copy, from: /x, path: /y}}\n", "j.yaml"
    )
    assert apply_patches([link()], [merge, ops])[0]["y"] == apply_patches([link()], [ops])[0]["x"]


# -- patch_and_check: errors point into the patch ------------------------------------------------


def test_validation_error_points_at_the_patch_line_that_set_the_value() -> None:
    patch = parse_patch(
        "kind: ClusterConfig\nnetwork:\n  dnsDomain: Not_A_Domain\n---\n"
        "kind: LinkConfig\nname: eth0\nmtu: 3\n",
        "net.yaml",
    )
    with pytest.raises(ConfigValidationError) as caught:
        patch_and_check(inputs.controlplane_raw(), [patch], target="controlplane.yaml")
    error = caught.value
    assert error.source == "controlplane.yaml"
    assert [(p.where, p.source, p.line) for p in error.problems] == [
        ("ClusterConfig.network.dnsDomain", "net.yaml", 3),
        ("LinkConfig(eth0).mtu", "net.yaml", 7),
    ]


def test_unpatched_problems_keep_the_target_as_source() -> None:
    base = inputs.controlplane_raw()
    inputs.find(base, "ClusterConfig")["name"] = "Bad Name"
    with pytest.raises(ConfigValidationError) as caught:
        patch_and_check(
            base,
            inputs.patches("kind: MachineConfig\ncertSANs: [a.example]\n"),
            target="controlplane.yaml",
        )
    (problem,) = caught.value.problems
    assert (problem.where, problem.source, problem.line) == (
        "ClusterConfig.name",
        "controlplane.yaml",
        None,
    )


def test_rule_problems_point_at_the_patch_too() -> None:
    patch = parse_patch(
        "kind: ClusterConfig\nnetwork:\n  serviceSubnets: [10.244.0.0/24]\n", "svc.yaml"
    )
    with pytest.raises(ConfigValidationError) as caught:
        patch_and_check(inputs.controlplane_raw(), [patch], target="controlplane.yaml")
    (problem,) = caught.value.problems
    assert problem.where == "ClusterConfig.network.serviceSubnets[0]"
    assert (problem.source, problem.line) == ("svc.yaml", 3)


def test_json_patch_problems_point_at_the_patch() -> None:
    patch = json_patch("- {op: add, path: /mtu, value: 5}\n")
    with pytest.raises(ConfigValidationError) as caught:
        patch_and_check([link()], [patch], target="eth0.yaml", complete=False)
    (problem,) = caught.value.problems
    assert (problem.where, problem.source, problem.line) == ("LinkConfig(eth0).mtu", "ops.yaml", 1)


def test_partial_configs_are_checked_without_demanding_every_document() -> None:
    patches = inputs.patches("kind: LinkConfig\nname: eth0\nmtu: 1400\n")
    bundle, warnings = patch_and_check([link()], patches, target="eth0.yaml", complete=False)
    assert warnings == []
    assert bundle.to_raw() == [link(up=True, dhcp=False, mtu=1400)]
    with pytest.raises(ConfigValidationError, match="MachineConfig: document is missing"):
        patch_and_check([link()], patches, target="eth0.yaml")


def test_patch_and_check_passes_the_mode_on() -> None:
    patches = inputs.patches("kind: MachineConfig\ninstall:\n  disk: {$patch: delete}\n")
    with pytest.raises(ConfigValidationError) as caught:
        patch_and_check(inputs.controlplane_raw(), patches, target="cp.yaml", mode=Mode.METAL)
    (problem,) = caught.value.problems
    assert problem.where == "MachineConfig.install.disk"
    _, warnings = patch_and_check(
        inputs.controlplane_raw(), [], target="cp.yaml", mode=Mode.CONTAINER
    )
    assert [w.severity for w in warnings] == ["warning"]
