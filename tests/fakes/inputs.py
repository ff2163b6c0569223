"""Ready-made inputs for config tests: one secrets bundle per session, generated configs.

Generating a secrets bundle takes a few milliseconds; hypothesis tests cannot use
function-scoped fixtures, so the bundles are cached here at module level and the
fixtures in ``tests/unit/conftest.py`` hand out the same objects.
"""

from __future__ import annotations

import functools
from typing import Any

from basalt.machinery.config import (
    ConfigBundle,
    GeneratedConfigs,
    GenerateOptions,
    Patch,
    generate_configs,
    parse_patch,
)
from basalt.machinery.config.secrets import SecretsBundle, generate_secrets

API = "basalt.dev/v1alpha1"
ENDPOINT = "https://192.0.2.10:6443"


@functools.cache
def session_secrets() -> SecretsBundle:
    """The one secrets bundle most tests share."""
    return generate_secrets()


@functools.cache
def other_secrets() -> SecretsBundle:
    """A second, unrelated bundle: its keys do not match the first one's certificates."""
    return generate_secrets()


def options(**changes: Any) -> GenerateOptions:
    """Typical ``gen config`` options, pinned to a contract so no warning is emitted."""
    values: dict[str, Any] = {
        "cluster_name": "demo",
        "endpoint": ENDPOINT,
        "version_contract": "0.1",
        "install_disk": "/dev/vda",
    }
    values.update(changes)
    return GenerateOptions(**values)


def patches(*texts: str) -> list[Patch]:
    return [parse_patch(text, f"patch-{i}.yaml") for i, text in enumerate(texts, start=1)]


def generate(*patch_texts: str, **option_changes: Any) -> GeneratedConfigs:
    return generate_configs(
        session_secrets(), options(**option_changes), patches=patches(*patch_texts)
    )


@functools.cache
def _default_texts() -> tuple[str, str]:
    configs = generate()
    return configs.controlplane.to_yaml(), configs.worker.to_yaml()


def controlplane_yaml() -> str:
    """The default control plane config as text (cached: the same bytes every call)."""
    return _default_texts()[0]


def worker_yaml() -> str:
    return _default_texts()[1]


def controlplane_raw() -> list[dict[str, Any]]:
    """Fresh, mutable data documents of the default control plane config."""
    return generate().controlplane.to_raw()


def worker_raw() -> list[dict[str, Any]]:
    return generate().worker.to_raw()


def find(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The document of ``kind`` (and ``name``) in data documents; fails the test if absent."""
    for document in documents:
        if document.get("kind") == kind and (name is None or document.get("name") == name):
            return document
    raise AssertionError(f"no {kind} {name or ''} in {[d.get('kind') for d in documents]}")


def doc(bundle: ConfigBundle, kind: str, name: str | None = None) -> dict[str, Any]:
    return find(bundle.to_raw(), kind, name)


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    """The 1-based line of the ``occurrence``-th line of ``text`` that contains ``needle``."""
    seen = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return number
    raise AssertionError(f"{needle!r} not found {occurrence} times")


def dump(documents: list[dict[str, Any]]) -> str:
    """Data documents as canonical multi-document YAML (what a user's file looks like)."""
    from basalt.machinery.yamlio import dump_documents

    return dump_documents(documents)
