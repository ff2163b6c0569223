"""The base classes of every config document, and the registry of document kinds."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

API_VERSION = "basalt.dev/v1alpha1"

#: Field metadata key that marks a list to be replaced, not appended to, by a merge patch.
MERGE_KEY = "x-merge"
#: Field metadata key that marks a secret: outputs show it only as changed or unchanged
#: (:mod:`basalt.machinery.config.redact`).
SECRET_KEY = "x-secret"


def replace_on_merge() -> dict[str, Any]:
    """``json_schema_extra`` for list fields that a strategic merge patch replaces."""
    return {MERGE_KEY: "replace"}


def secret() -> dict[str, Any]:
    """``json_schema_extra`` for a field whose value is a secret (a private key, a token)."""
    return {SECRET_KEY: True}


class Model(BaseModel):
    """A part of a config document: camelCase keys, unknown fields are errors."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=False,
        serialize_by_alias=True,
        use_attribute_docstrings=False,
        str_strip_whitespace=False,
    )


class Document(Model):
    """One YAML document of a machine config: ``apiVersion`` + ``kind`` + fields.

    Singleton kinds appear at most once per config. Named kinds (``named = True``)
    carry a ``name`` and appear once per name; merge patches match on kind + name.
    """

    named: ClassVar[bool] = False
    api_version: Literal["basalt.dev/v1alpha1"] = Field(
        alias="apiVersion", description="Always `basalt.dev/v1alpha1`."
    )

    @classmethod
    def kind_name(cls) -> str:
        return cls.__name__

    @property
    def display_name(self) -> str:
        """``LinkConfig(eth0)`` for named documents, the bare kind otherwise."""
        name = getattr(self, "name", None)
        return f"{self.kind_name()}({name})" if self.named and name else self.kind_name()


DOCUMENT_KINDS: dict[str, type[Document]] = {}


D = TypeVar("D", bound=type[Document])


#: The order kinds are listed in (docs, errors, hints), whatever order modules load in.
KIND_ORDER = (
    "MachineConfig",
    "ClusterConfig",
    "HostnameConfig",
    "LinkConfig",
    "ResolverConfig",
    "TimeSyncConfig",
    "SysctlConfig",
    "KernelModuleConfig",
    "EtcFileConfig",
    "EnvironmentConfig",
    "LoggingConfig",
    "ImageVerificationConfig",
)


def register(cls: D) -> D:
    """Class decorator: make ``cls`` a known document kind."""
    DOCUMENT_KINDS[cls.kind_name()] = cls
    ordered = sorted(
        DOCUMENT_KINDS.items(),
        key=lambda kv: KIND_ORDER.index(kv[0]) if kv[0] in KIND_ORDER else len(KIND_ORDER),
    )
    DOCUMENT_KINDS.clear()
    DOCUMENT_KINDS.update(ordered)
    return cls


def document_key(kind: str, name: Any) -> str:
    """The identity of a document inside a config (kind, plus name for named kinds)."""
    cls = DOCUMENT_KINDS.get(kind)
    if cls is not None and cls.named:
        return f"{kind}({name})"
    return kind
