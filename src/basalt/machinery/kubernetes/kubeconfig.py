"""Kubeconfig files: build them with inline credentials, and merge one into another.

Merging follows what kubectl users expect from ``talosctl kubeconfig`` or ``kind``:
the new cluster, user and context are added; an entry whose name is taken by a
different entry is stored under ``NAME-1`` (``-2`` ...), an identical one is reused;
the new context becomes the current one; everything else in the file is kept.
"""

from __future__ import annotations

import base64
import copy
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import BasaltError
from ..pki import CertificateAndKey
from ..yamlio import dump_document

#: The sections that hold named entries, and the key of each entry's body.
_SECTIONS = (("clusters", "cluster"), ("users", "user"), ("contexts", "context"))


class KubeconfigError(BasaltError):
    """A kubeconfig file is not valid YAML or not shaped like a kubeconfig."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def build_kubeconfig(
    *,
    cluster: str,
    server: str,
    ca_crt: str,
    user: str,
    client: CertificateAndKey | None = None,
    token: str | None = None,
    namespace: str | None = None,
) -> dict[str, Any]:
    """A kubeconfig with one cluster, one user (a client certificate or a token), one context."""
    credentials: dict[str, str] = {}
    if client is not None:
        assert client.key is not None
        credentials["client-certificate-data"] = _b64(client.crt)
        credentials["client-key-data"] = _b64(client.key)
    if token is not None:
        credentials["token"] = token
    context_name = f"{user}@{cluster}"
    context: dict[str, str] = {"cluster": cluster, "user": user}
    if namespace:
        context["namespace"] = namespace
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": cluster,
                "cluster": {"server": server, "certificate-authority-data": _b64(ca_crt)},
            }
        ],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": context_name, "context": context}],
        "current-context": context_name,
        "preferences": {},
    }


def dump_kubeconfig(config: dict[str, Any]) -> str:
    return dump_document(config)


def parse_kubeconfig(text: str, source: str) -> dict[str, Any]:
    """A kubeconfig as data; an empty text is an empty kubeconfig."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KubeconfigError(
            f"{source} is not valid YAML: {exc}",
            hint="fix or move the file, or write elsewhere with a PATH argument",
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise KubeconfigError(
            f"{source} is not a kubeconfig (a YAML mapping)",
            hint="fix or move the file, or write elsewhere with a PATH argument",
        )
    for section, body in _SECTIONS:
        entries = data.get(section)
        if entries is None:
            continue
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries
        ):
            raise KubeconfigError(
                f"{source}: {section} must be a list of entries, each with a name and a {body}",
                hint="fix or move the file, or write elsewhere with a PATH argument",
            )
    return data


@dataclass
class MergeResult:
    """The merged kubeconfig and what the merge did."""

    config: dict[str, Any]
    #: (section, original name, stored name) for every entry added under a new name.
    renamed: list[tuple[str, str, str]] = field(default_factory=list)
    current_context: str = ""


def _store(entries: list[dict[str, Any]], entry: dict[str, Any]) -> tuple[str, bool]:
    """Add ``entry`` unless an identical one exists: (the name it is stored under, added)."""
    by_name = {e["name"]: e for e in entries}
    name = str(entry["name"])
    stored = name
    suffix = 0
    while stored in by_name and by_name[stored] != {**entry, "name": stored}:
        suffix += 1
        stored = f"{name}-{suffix}"
    if stored in by_name:
        return stored, False
    entries.append({**entry, "name": stored})
    return stored, True


def merge_kubeconfig(existing: dict[str, Any], new: dict[str, Any]) -> MergeResult:
    """``new``'s clusters, users and contexts added to ``existing`` (which is not changed)."""
    merged = copy.deepcopy(existing)
    merged.setdefault("apiVersion", "v1")
    merged.setdefault("kind", "Config")
    result = MergeResult(merged)
    names: dict[str, dict[str, str]] = {}
    for section, body in _SECTIONS:
        entries = merged.get(section) or []
        merged[section] = entries
        names[section] = {}
        for entry in copy.deepcopy(new.get(section) or []):
            if section == "contexts":
                # Point the context at the cluster and user as they were stored.
                inner = entry.setdefault(body, {})
                for key, ref in (("cluster", "clusters"), ("user", "users")):
                    if key in inner:
                        inner[key] = names[ref].get(inner[key], inner[key])
            stored, added = _store(entries, entry)
            names[section][entry["name"]] = stored
            if added and stored != entry["name"]:
                result.renamed.append((section, entry["name"], stored))
    wanted = new.get("current-context")
    if wanted:
        merged["current-context"] = names["contexts"].get(wanted, wanted)
    result.current_context = str(merged.get("current-context") or "")
    return result
