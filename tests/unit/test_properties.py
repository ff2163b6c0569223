"""Property tests: configs survive load -> dump -> load, and no input crashes the library.

The fuzz tests feed random YAML text, mutated real configs, random data documents,
random merge patches and random JSON-patch operations to the public entry points. The
only exceptions allowed out are :class:`ConfigError` subclasses (client config:
:class:`BasaltError`), each of which the CLI turns into a readable message.

Budget: the fuzz tests below run well over 2,000 examples together and the module
stays under a minute; examples counts are set explicitly on each test.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import ipaddress
import os
import string
from collections.abc import Callable
from typing import Any, TypeVar

import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from basalt.machinery.client.config import ClientConfig, Context, parse_client_config
from basalt.machinery.config import (
    DOCUMENT_KINDS,
    GenerateOptions,
    JSONPatch,
    MergePatch,
    Mode,
    Patch,
    apply_patches,
    bundle_from_raw,
    check_bundle,
    generate_configs,
    load_bundle,
    parse_patch,
    patch_and_check,
)
from basalt.machinery.config.contract import Contract, resolve_contract
from basalt.machinery.config.secrets import load_secrets
from basalt.machinery.errors import BasaltError, ConfigError
from basalt.machinery.yamlio import dump_document
from tests.fakes import inputs

T = TypeVar("T")

API = inputs.API
KINDS = sorted(DOCUMENT_KINDS)
MODES = [None, Mode.METAL, Mode.CONTAINER]


#: Multiplies every example count: BASALT_FUZZ_SCALE=20 for a long fuzzing session.
SCALE = int(os.environ.get("BASALT_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    return settings(
        max_examples=examples * SCALE,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


def only_config_errors(call: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run ``call``; a ConfigError is an answer, anything else fails the test."""
    name = getattr(call, "__name__", "call")
    try:
        result = call(*args, **kwargs)
    except ConfigError as error:
        assert str(error)  # and every error has something to say
        error.render()
        event(f"{name}: {type(error).__name__}")  # see --hypothesis-show-statistics
        return None
    event(f"{name}: ok")
    return result


def _paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [here]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*here, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            out += _paths(item, (*here, index))
    return out


# -- vocabulary ------------------------------------------------------------------------------


def _collect_keys(model: type[BaseModel], into: set[str]) -> None:
    for name, info in model.model_fields.items():
        into.add(info.alias or name)
        annotation = info.annotation
        for arg in (annotation, *getattr(annotation, "__args__", ())):
            for inner in (arg, *getattr(arg, "__args__", ())):
                if isinstance(inner, type) and issubclass(inner, BaseModel) and inner is not model:
                    _collect_keys(inner, into)


@functools.cache
def field_keys() -> list[str]:
    keys: set[str] = set()
    for model in DOCUMENT_KINDS.values():
        _collect_keys(model, keys)
    return sorted(keys | {"$patch", "network", "podSubnets", "crt", "key"})


@functools.cache
def interesting_strings() -> list[str]:
    secrets = inputs.session_secrets()
    return [
        API,
        "v1",
        "delete",
        "replace",
        "merge",
        "controlplane",
        "worker",
        "0.1",
        "9.9",
        "v0.1",
        "10.244.0.0/16",
        "10.96.0.0/12",
        "10.0.0.1/8",
        "fd00::/8",
        "192.0.2.5/24",
        "192.0.2.1",
        "::1",
        "not-an-ip",
        "https://192.0.2.10:6443",
        "https://cp:0",
        "tcp://x:1",
        "http://",
        "cluster.local",
        "UPPER.case",
        "a" * 70,
        "/dev/vda",
        "/etc/x",
        "../x",
        "x/../../y",
        "abcdef.0123456789abcdef",
        "AAAA",
        secrets.cluster.id,
        secrets.certs.os.crt,
        secrets.certs.os.key or "",
        secrets.certs.etcd.key or "",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        "eth0",
        "eth1",
        "net.ipv4.ip_forward",
        "br_netfilter",
        "HTTPS_PROXY",
        "",
        " ",
        "~",
        "null",
        "\n",
        "\x00",
        "é",
        "\u2028",
        "{",
        "$patch",
        *KINDS,
    ]


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(interesting_strings()),
)
keys = st.one_of(st.sampled_from(field_keys()), st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=16,
)


def mostly(
    common: st.SearchStrategy[T], rare: st.SearchStrategy[T], ratio: int = 9
) -> st.SearchStrategy[T]:
    """``common`` about ``ratio`` times as often as ``rare``.

    (``st.one_of`` drops repeated strategies, so repeating one does not weight it; and
    hypothesis favours the bounds of a range, so the rare pick is 1.)
    """
    return st.integers(0, ratio).flatmap(lambda pick: rare if pick == 1 else common)


def one_in(draw: st.DrawFn, n: int) -> bool:
    """True about once in ``n`` draws.

    Hypothesis favours 0 and the bounds of a range, so neither of them means "yes".
    """
    return draw(st.integers(0, n)) == 1


@functools.cache
def real_subtrees() -> list[Any]:
    """Every value found in the generated configs, from whole maps down to scalars."""
    out: list[Any] = []
    for documents in (inputs.controlplane_raw(), inputs.worker_raw()):
        for document in documents:
            for path in _paths(document)[1:]:
                node: Any = document
                for part in path:
                    node = node[part]
                out.append(node)
    return out


# values that often pass validation, so that fuzzing reaches the later stages too
realistic = st.one_of(
    st.sampled_from(interesting_strings()),
    st.sampled_from(real_subtrees()).map(copy.deepcopy),
    values,
)


# -- (1) load -> dump -> load is the identity ---------------------------------------------------

label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostnames = st.lists(label, min_size=1, max_size=4).map(".".join)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
hosts_or_ips = st.one_of(hostnames, ipv4, ipv6)
# YAML text is UTF-8: lone surrogates cannot appear in a file, so none in generated values.
TRICKY_CHARACTERS = "\n\r\t \x85\u2028\u2029\x0b\x0c\x1c\ufeff\xa0#:'\"-|>&*!%@`{}[],?"
free_text = st.text(
    st.one_of(st.characters(codec="utf-8"), st.sampled_from(TRICKY_CHARACTERS)), max_size=40
)


@st.composite
def endpoints(draw: st.DrawFn) -> str:
    host = draw(st.one_of(hostnames, ipv4, ipv6.map(lambda a: f"[{a}]")))
    port = draw(st.one_of(st.none(), st.integers(1, 65535)))
    return f"https://{host}" + (f":{port}" if port else "")


@st.composite
def interface_addresses(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return f"{draw(ipv4)}/{draw(st.integers(0, 32))}"
    return f"{draw(ipv6)}/{draw(st.integers(0, 128))}"


@st.composite
def subnets(draw: st.DrawFn) -> str:
    address = draw(interface_addresses())
    return str(ipaddress.ip_interface(address).network)


def link_documents() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "kind": st.just("LinkConfig"),
            "name": st.from_regex(r"[A-Za-z0-9_.:-]{1,15}", fullmatch=True),
        },
        optional={
            "up": st.booleans(),
            "dhcp": st.booleans(),
            "mtu": st.integers(68, 65535),
            "addresses": st.lists(interface_addresses(), max_size=3),
            "routes": st.lists(
                st.fixed_dictionaries(
                    {"gateway": st.one_of(ipv4, ipv6)},
                    optional={"network": subnets(), "metric": st.integers(0, 2**32 - 1)},
                ),
                max_size=2,
            ),
        },
    )


def extra_documents() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        link_documents(),
        st.fixed_dictionaries(
            {
                "kind": st.just("ResolverConfig"),
                "nameservers": st.lists(st.one_of(ipv4, ipv6), max_size=3),
                "searchDomains": st.lists(hostnames, max_size=3),
            }
        ),
        st.fixed_dictionaries(
            {
                "kind": st.just("SysctlConfig"),
                "sysctls": st.dictionaries(
                    st.from_regex(r"[a-z0-9_]+([./][a-zA-Z0-9_:@-]+)+", fullmatch=True),
                    free_text,
                    max_size=3,
                ),
            }
        ),
        st.fixed_dictionaries(
            {
                "kind": st.just("EtcFileConfig"),
                "name": st.lists(label, min_size=1, max_size=3)
                .map("/".join)
                .filter(lambda n: n not in {"hostname", "hosts"}),
                "contents": free_text,
                "mode": st.integers(0, 0o777),
            }
        ),
        st.fixed_dictionaries(
            {
                "kind": st.just("EnvironmentConfig"),
                "variables": st.dictionaries(
                    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
                    free_text,
                    max_size=3,
                ),
            }
        ),
        st.fixed_dictionaries({"kind": st.just("HostnameConfig"), "hostname": hostnames}),
        st.fixed_dictionaries(
            {
                "kind": st.just("KernelModuleConfig"),
                "name": st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True),
                "parameters": st.lists(
                    st.tuples(st.from_regex(r"[A-Za-z0-9_.-]{1,8}", fullmatch=True), free_text).map(
                        "=".join
                    ),
                    max_size=2,
                ),
            }
        ),
        st.fixed_dictionaries(
            {
                "kind": st.just("TimeSyncConfig"),
                "servers": st.lists(hosts_or_ips, min_size=1, max_size=2),
            }
        ),
        st.fixed_dictionaries(
            {
                "kind": st.just("MachineConfig"),
                "kubelet": st.fixed_dictionaries(
                    {"extraArgs": st.dictionaries(label, free_text, max_size=3)}
                ),
            }
        ),
    )


@st.composite
def generate_inputs(draw: st.DrawFn) -> tuple[GenerateOptions, list[Patch]]:
    options = GenerateOptions(
        cluster_name=draw(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)),
        endpoint=draw(endpoints()),
        version_contract=draw(st.sampled_from([None, "0.1", "v0.1"])),
        kubernetes_version=draw(
            st.one_of(
                st.none(),
                st.tuples(
                    st.integers(0, 99),
                    st.integers(0, 99),
                    st.integers(0, 99),
                    st.sampled_from(["", "v"]),
                ).map(lambda t: f"{t[3]}{t[0]}.{t[1]}.{t[2]}"),
            )
        ),
        install_disk=draw(st.one_of(st.none(), label.map(lambda n: f"/dev/{n}"))),
        install_image=draw(st.one_of(st.none(), free_text)),
        additional_sans=tuple(draw(st.lists(hosts_or_ips, max_size=4))),
        dns_domain=draw(st.one_of(st.none(), hostnames)),
    )
    documents = draw(st.lists(extra_documents(), max_size=4))
    texts = [yaml.safe_dump(document, allow_unicode=True) for document in documents]
    return options, [parse_patch(text, f"extra-{i}.yaml") for i, text in enumerate(texts)]


@fuzz(300)
@given(generate_inputs())
def test_load_dump_load_is_identity_for_generated_configs(
    case: tuple[GenerateOptions, list[Patch]],
) -> None:
    options, patches = case
    secrets = inputs.session_secrets()
    configs = generate_configs(secrets, options, patches=patches)
    again = generate_configs(secrets, options, patches=patches)
    for bundle, repeat in (
        (configs.controlplane, again.controlplane),
        (configs.worker, again.worker),
    ):
        text = bundle.to_yaml()
        assert repeat.to_yaml() == text  # deterministic
        loaded = load_bundle(text, "config.yaml")
        assert loaded.documents == bundle.documents
        assert loaded.to_raw() == bundle.to_raw()
        assert loaded.to_yaml() == text  # the dump is a fixed point
        check_bundle(loaded)
    assert "PRIVATE KEY" not in configs.worker.to_yaml()


@fuzz(200)
@given(
    st.dictionaries(
        st.sampled_from(sorted(inputs.session_secrets().model_dump())), values, max_size=3
    )
)
def test_secrets_round_trip_and_fuzzed_secrets(changes: dict[str, Any]) -> None:
    secrets = inputs.session_secrets()
    text = secrets.to_yaml()
    assert load_secrets(text) == secrets
    data = yaml.safe_load(text)
    data.update(changes)
    only_config_errors(load_secrets, dump_document(data), "secrets.yaml")


# -- (2) fuzzed text --------------------------------------------------------------------------

YAML_TOKENS = [
    "kind",
    "apiVersion",
    "name",
    "network",
    "podSubnets",
    ":",
    ": ",
    "- ",
    "-",
    "[",
    "]",
    "{",
    "}",
    ", ",
    "&a ",
    "*a",
    "*b",
    "&b ",
    "!!str ",
    "!!binary ",
    "!!int ",
    "!!map ",
    "!!set ",
    "!!python/name:os.system ",
    "!local ",
    "? ",
    "|",
    ">",
    "|-",
    "|+2",
    "'",
    '"',
    "# c",
    "---\n",
    "...\n",
    "\n",
    "\n  ",
    "\n    ",
    "\t",
    "%YAML 1.1\n",
    "%TAG ! x\n",
    "<<: ",
    "~",
    "null",
    "true",
    "1e9",
    "0x1F",
    "0o17",
    ".nan",
    "2024-01-01",
    "12:30:00",
    "\\",
    "\x00",
    "\ufeff",
    "\x85",
    "é",
    "\U0001f600",
    "$patch",
    "delete",
    API,
    *KINDS,
]
token_soup = st.lists(
    st.one_of(st.sampled_from(YAML_TOKENS), st.text(max_size=4)), max_size=40
).map("".join)
yaml_text = st.one_of(st.text(max_size=200), token_soup)


@fuzz(1500)
@given(yaml_text)
def test_fuzzed_yaml_text_raises_only_config_errors(text: str) -> None:
    bundle = only_config_errors(load_bundle, text, "fuzz.yaml")
    if bundle is not None:
        for mode in MODES:
            only_config_errors(check_bundle, bundle, mode)
        only_config_errors(lambda: load_bundle(bundle.to_yaml()))
    patch = only_config_errors(parse_patch, text, "fuzz-patch.yaml")
    if patch is not None:
        only_config_errors(
            patch_and_check, inputs.controlplane_raw(), [patch], target="controlplane.yaml"
        )
        only_config_errors(
            apply_patches, [{"apiVersion": API, "kind": "LinkConfig", "name": "eth0"}], [patch]
        )
    only_config_errors(load_secrets, text, "secrets.yaml")
    with contextlib.suppress(BasaltError):  # ClientConfigError is not a ConfigError
        parse_client_config(text, "basaltconfig")


@st.composite
def mutated_config_text(draw: st.DrawFn) -> str:
    """A real config with a few lines deleted, repeated, moved, re-indented or edited."""
    base = draw(st.sampled_from([inputs.controlplane_yaml(), inputs.worker_yaml()]))
    lines = base.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        at = draw(st.integers(0, len(lines) - 1))
        action = draw(
            st.sampled_from(
                [
                    "delete",
                    "repeat",
                    "move",
                    "indent",
                    "dedent",
                    "edit",
                    "value",
                    "value",
                    "value",
                    "insert",
                ]
            )
        )
        line = lines[at]
        if action == "delete":
            del lines[at]
        elif action == "repeat":
            lines.insert(at, line)
        elif action == "move":
            lines.insert(draw(st.integers(0, len(lines))), lines.pop(at))
        elif action == "indent":
            lines[at] = "  " + line
        elif action == "dedent":
            lines[at] = line[2:] if line.startswith("  ") else line.lstrip()
        elif action == "edit":
            cut = draw(st.integers(0, len(line)))
            lines[at] = line[:cut] + draw(st.sampled_from(YAML_TOKENS)) + line[cut:]
        elif action == "value" and ":" in line:
            key = line.split(":", 1)[0]
            replacement = draw(st.sampled_from(interesting_strings()))
            lines[at] = f"{key}: {yaml.safe_dump(replacement, default_flow_style=True).strip()}\n"
            lines[at] = lines[at].replace("\n...", "")
        elif action == "insert":
            indent = line[: len(line) - len(line.lstrip())]
            lines.insert(at, f"{indent}{draw(keys)}: {draw(st.sampled_from(YAML_TOKENS))}\n")
    return "".join(lines)


@fuzz(1000)
@given(mutated_config_text())
def test_mutated_real_configs_raise_only_config_errors(text: str) -> None:
    bundle = only_config_errors(load_bundle, text, "cp.yaml")
    if bundle is not None:
        for mode in MODES:
            problems = only_config_errors(check_bundle, bundle, mode)
            assert problems is None or all(p.severity == "warning" for p in problems)


# -- (2) fuzzed data and patches ---------------------------------------------------------------


def _set(root: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    parent = root
    for part in path[:-1]:
        parent = parent[part]
    parent[path[-1]] = new
    return root


@st.composite
def mutated_documents(draw: st.DrawFn) -> list[Any]:
    """Real documents (plus random extra ones) with random subtrees replaced or removed."""
    documents: list[Any] = draw(st.sampled_from([inputs.controlplane_raw, inputs.worker_raw]))()
    documents += draw(
        st.lists(
            st.dictionaries(keys, values, max_size=4).map(
                lambda d: {"apiVersion": API, "kind": "LinkConfig", "name": "eth0", **d}
            )
            | st.builds(
                lambda k, d: {"kind": k, **d},
                st.sampled_from(KINDS),
                st.dictionaries(keys, values, max_size=4),
            ),
            max_size=2,
        )
    )
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(documents)[1:]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        parent_path, last = path[:-1], path[-1]
        parent = documents
        for part in parent_path:
            parent = parent[part]
        if action == "delete":
            del parent[last]
        elif action == "add":
            target = parent[last]
            if isinstance(target, dict):
                target[draw(keys)] = draw(realistic)
            elif isinstance(target, list):
                target.append(draw(realistic))
        else:
            _set(documents, path, draw(realistic))
    return documents


@fuzz(500)
@given(mutated_documents(), st.sampled_from(MODES))
def test_fuzzed_documents_raise_only_config_errors(documents: list[Any], mode: Mode | None) -> None:
    bundle = only_config_errors(bundle_from_raw, documents, "fuzz.yaml")
    if bundle is not None:
        only_config_errors(check_bundle, bundle, mode)
        only_config_errors(check_bundle, bundle, mode, complete=False)
        reloaded = load_bundle(bundle.to_yaml())
        assert reloaded.to_raw() == bundle.to_raw()


def _with_directives(value: Any, draw: st.DrawFn, *, top: bool = False) -> Any:
    """Sprinkle ``$patch`` directives into maps, mostly valid ones in valid places.

    ``top``: ``value`` is a document's body (its own directive is chosen elsewhere).
    """
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            deleted = one_in(draw, 11)
            out[key] = {"$patch": "delete"} if deleted else _with_directives(item, draw)
        if not top and one_in(draw, 7):
            out["$patch"] = draw(mostly(st.just("replace"), st.sampled_from(["bogus", 1])))
        return out
    if isinstance(value, list):
        return [_with_directives(v, draw) for v in value]
    return value


NAMES = ["eth0", "eth1", "br_netfilter", "cni/net.d/10.conf"]


@st.composite
def merge_patch_documents(draw: st.DrawFn) -> dict[str, Any]:
    document: dict[str, Any]
    shape = draw(st.sampled_from(["aimed", "aimed", "aimed", "valid", "valid", "random"]))
    if shape == "valid":
        document = draw(extra_documents())
    elif shape == "aimed":
        # set one real field of a real document to something, often something sensible
        real = inputs.find(
            inputs.controlplane_raw(), draw(st.sampled_from(["MachineConfig", "ClusterConfig"]))
        )
        paths = [p for p in _paths(real)[1:] if p[0] not in ("kind", "apiVersion")]
        path = [p for p in draw(st.sampled_from(paths)) if isinstance(p, str)]
        document = {"kind": real["kind"]}
        node = document
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if path:
            node[path[-1]] = draw(realistic)
    else:
        kind = draw(mostly(st.sampled_from(KINDS), scalars))
        document = {} if one_in(draw, 19) else {"kind": kind}
        model = DOCUMENT_KINDS.get(kind) if isinstance(kind, str) else None
        if (model is not None and model.named) or one_in(draw, 9):
            document["name"] = draw(mostly(st.sampled_from(NAMES), scalars))
        body = draw(st.dictionaries(keys, realistic, max_size=4))
        header = ("kind", "name", "apiVersion", "$patch")
        document.update({k: v for k, v in body.items() if k not in header})
    if one_in(draw, 9):
        document["apiVersion"] = draw(mostly(st.just(API), st.just("v1")))
    header = {k: v for k, v in document.items() if k in ("kind", "name", "apiVersion")}
    body = {k: v for k, v in document.items() if k not in header}
    document = {**header, **_with_directives(body, draw, top=True)}
    if one_in(draw, 14):
        document["$patch"] = draw(mostly(st.just("delete"), st.just("replace")))
    return document


@st.composite
def merge_patches(draw: st.DrawFn) -> Patch:
    documents = draw(st.lists(merge_patch_documents(), min_size=1, max_size=3))
    if one_in(draw, 19):
        documents.append(draw(values))  # a document that is not a mapping
    text = yaml.safe_dump_all(documents, allow_unicode=True)
    patch = parse_patch(text, "fuzz-merge.yaml")
    assume(isinstance(patch, MergePatch))
    return patch


@fuzz(500)
@given(st.lists(merge_patches(), min_size=1, max_size=3), st.sampled_from(MODES), st.booleans())
def test_fuzzed_merge_patches_raise_only_config_errors(
    patches: list[Patch], mode: Mode | None, complete: bool
) -> None:
    base = inputs.controlplane_raw()
    before = copy.deepcopy(base)
    patch_data = copy.deepcopy(
        [[d.data for d in p.documents] for p in patches if isinstance(p, MergePatch)]
    )
    only_config_errors(
        patch_and_check, base, patches, target="controlplane.yaml", mode=mode, complete=complete
    )
    assert base == before, "a patch changed its input documents"
    assert [[d.data for d in p.documents] for p in patches if isinstance(p, MergePatch)] == (
        patch_data
    ), "applying a patch changed the patch"


@functools.cache
def _single_documents() -> list[dict[str, Any]]:
    cp = inputs.controlplane_raw()
    return [
        *cp,
        {
            "apiVersion": API,
            "kind": "LinkConfig",
            "name": "eth0",
            "mtu": 1500,
            "addresses": ["192.0.2.5/24"],
            "routes": [{"gateway": "192.0.2.1"}],
        },
    ]


def _pointer(path: tuple[Any, ...]) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


OPS = ["add", "remove", "replace", "move", "copy", "test"]


@st.composite
def json_operations(draw: st.DrawFn, document: dict[str, Any]) -> Any:
    existing = [_pointer(p) for p in _paths(document)]
    pointer = st.one_of(
        st.sampled_from(existing),
        st.sampled_from(existing).map(lambda p: p + "/-"),
        st.sampled_from(existing).map(lambda p: p + "/0"),
        st.sampled_from(existing).map(lambda p: p + "/new"),
        st.sampled_from(["", "/", "~", "/~2", "/-", "/0/1", "x", "/²", "/01", "/mtu"]),
        st.text(max_size=8),
        scalars,
    )
    pointer = mostly(st.sampled_from(existing), pointer, 5)
    if one_in(draw, 29):
        return draw(values)  # not even a mapping
    op = draw(mostly(st.sampled_from(OPS), scalars, 14))
    operation: dict[str, Any] = {"op": op, "path": draw(pointer)}
    if (op in ("add", "replace", "test") and not one_in(draw, 9)) or one_in(draw, 9):
        operation["value"] = draw(realistic)
    if (op in ("move", "copy") and not one_in(draw, 9)) or one_in(draw, 9):
        operation["from"] = draw(pointer)
    if one_in(draw, 19):
        del operation[draw(st.sampled_from(["op", "path"]))]
    return operation


@st.composite
def json_cases(draw: st.DrawFn) -> tuple[dict[str, Any], JSONPatch]:
    document = copy.deepcopy(draw(st.sampled_from(_single_documents())))
    operations = draw(st.lists(json_operations(document), min_size=1, max_size=4))
    return document, JSONPatch("fuzz-ops.yaml", operations, 1)


@fuzz(600)
@given(json_cases(), st.sampled_from(MODES))
def test_fuzzed_json_patches_raise_only_config_errors(
    case: tuple[dict[str, Any], JSONPatch], mode: Mode | None
) -> None:
    document, patch = case
    before = copy.deepcopy(document)
    operations = copy.deepcopy(patch.operations)
    only_config_errors(
        patch_and_check, [document], [patch], target="one.yaml", mode=mode, complete=False
    )
    assert document == before
    assert patch.operations == operations
    # and the same patch is always refused on a multi-document target
    outcome = only_config_errors(apply_patches, inputs.controlplane_raw(), [patch])
    assert outcome is None


@fuzz(300)
@given(
    st.builds(
        GenerateOptions,
        cluster_name=st.one_of(st.text(max_size=20), label),
        endpoint=st.one_of(st.text(max_size=30), endpoints()),
        version_contract=mostly(
            st.sampled_from([None, "0.1"]),
            st.one_of(st.text(max_size=6), st.sampled_from(["0.2", "1.0", "v0.1", "0.0"])),
            3,
        ),
        kubernetes_version=st.one_of(st.none(), st.text(max_size=8)),
        install_disk=st.one_of(st.none(), st.text(max_size=10)),
        install_image=st.one_of(st.none(), st.text(max_size=10)),
        additional_sans=st.lists(st.one_of(st.text(max_size=10), hosts_or_ips), max_size=3).map(
            tuple
        ),
        dns_domain=st.one_of(st.none(), st.text(max_size=10), hostnames),
    )
)
def test_fuzzed_generate_options_raise_only_config_errors(options: GenerateOptions) -> None:
    configs = only_config_errors(generate_configs, inputs.session_secrets(), options)
    if configs is not None:
        assert "PRIVATE KEY" not in configs.worker.to_yaml()
        for bundle in (configs.controlplane, configs.worker):
            assert load_bundle(bundle.to_yaml()).to_raw() == bundle.to_raw()


@fuzz(200)
@given(st.one_of(st.text(max_size=10), st.text(alphabet=string.digits + ".v -", max_size=8)))
def test_fuzzed_contracts_raise_only_contract_errors(text: str) -> None:
    contract = only_config_errors(Contract.parse, text)
    if contract is not None:
        assert Contract.parse(str(contract)) == contract
    only_config_errors(resolve_contract, text)


# -- client config ------------------------------------------------------------------------------

pem_like = st.one_of(free_text, st.sampled_from(interesting_strings()))
client_contexts = st.builds(
    Context,
    ca=pem_like,
    crt=pem_like,
    key=pem_like,
    endpoints=st.lists(hosts_or_ips, max_size=3),
    nodes=st.lists(hosts_or_ips, max_size=3),
)
client_configs = st.builds(
    ClientConfig,
    context=st.one_of(st.none(), label),
    contexts=st.dictionaries(st.one_of(label, free_text), client_contexts, max_size=3),
)


@fuzz(200)
@given(client_configs, client_configs)
def test_client_config_round_trips_and_merges(mine: ClientConfig, other: ClientConfig) -> None:
    assert parse_client_config(mine.to_yaml(), "cfg") == mine
    before = set(mine.contexts)
    renamed = mine.merge(other)
    assert before <= set(mine.contexts)  # nothing is overwritten
    for original, stored in renamed:
        assert stored.startswith(f"{original}-")
        assert mine.contexts[stored] == other.contexts[original]
    assert parse_client_config(mine.to_yaml(), "cfg") == mine


@fuzz(300)
@given(st.dictionaries(st.sampled_from(["context", "contexts", "contxt"]), values, max_size=3))
def test_fuzzed_client_configs_raise_only_basalt_errors(data: dict[str, Any]) -> None:
    with contextlib.suppress(BasaltError):
        parse_client_config(dump_document(data), "basaltconfig")
