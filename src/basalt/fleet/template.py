"""Cluster templates: ``apiVersion: fleet.basalt.dev/v1alpha1``, ``kind: Cluster``.

A template is kept in Git and says what a cluster is: its name, endpoint, version
contract, the control plane's count and machine selector, worker sets, and patches at
cluster, machine-set and machine scope in the formats ``gen config --config-patch``
takes (a mapping or several documents: a strategic merge patch; a list: an RFC 6902
JSON patch; a string: either, as YAML text). Errors name the template's field path and
line, and the patch that broke the config.

    apiVersion: fleet.basalt.dev/v1alpha1
    kind: Cluster
    name: prod
    versionContract: "0.1"
    controlPlane:
      count: 3
      machineSelector: {role: cp}
    workers:
      - name: default
        count: 2
        machineSelector: {zone: a}
        patches:
          - {kind: SysctlConfig, sysctls: {vm.max_map_count: "262144"}}
    patches: []
    machines:
      0b5e...-uuid: {patches: [...]}
    backup: {interval: 6h, keep: 7}     # etcd snapshots (none without it)
    updates: {channel: stable}          # rollouts of this channel take the cluster
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from basalt.machinery.config import Patch
from basalt.machinery.config.patch import parse_patch
from basalt.machinery.errors import (
    BasaltError,
    ConfigValidationError,
    ErrorKind,
    Problem,
    format_path,
)
from basalt.machinery.yamlio import parse_documents

API_VERSION = "fleet.basalt.dev/v1alpha1"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class TemplateError(BasaltError):
    kind = ErrorKind.INVALID_ARGUMENT


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("must be a DNS label: a-z, 0-9 and '-', at most 63 characters")
    return value


def _uuid(value: str) -> str:
    if not _UUID.match(value.lower()):
        raise ValueError(f"{value!r} is not a machine UUID")
    return value.lower()


Name = Annotated[str, AfterValidator(_name)]
RawPatch = dict[str, Any] | list[Any] | str


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class MachinePatches(_Model):
    patches: list[RawPatch] = Field(default_factory=list)


class MachineSet(_Model):
    count: int = Field(ge=0, le=1000)
    machine_selector: dict[str, str] = Field(default_factory=dict, alias="machineSelector")
    patches: list[RawPatch] = Field(default_factory=list)


class ControlPlane(MachineSet):
    count: int = Field(ge=1, le=15)


class WorkerSet(MachineSet):
    name: Name = "default"


_INTERVAL = re.compile(r"^(\d+)([mhd])$")


def _interval(value: str) -> str:
    match = _INTERVAL.match(value)
    if not match or int(match.group(1)) == 0:
        raise ValueError("must be a number of minutes, hours or days: 30m, 6h, 1d")
    return value


def interval_seconds(value: str) -> float:
    match = _INTERVAL.match(value)
    assert match is not None
    return int(match.group(1)) * {"m": 60, "h": 3600, "d": 86400}[match.group(2)]


class BackupPolicy(_Model):
    """etcd snapshots taken by the fleet through a control plane's link."""

    interval: Annotated[str, AfterValidator(_interval)] = "6h"
    keep: int = Field(default=7, ge=1, le=1000)


class UpdatePolicy(_Model):
    """Which release channel the cluster follows: rollouts of that channel include it."""

    channel: Name = "stable"


class ClusterTemplate(_Model):
    api_version: Literal["fleet.basalt.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["Cluster"]
    name: Name
    #: Labels of the cluster (users can be limited to clusters by label).
    labels: dict[str, str] = Field(default_factory=dict)
    endpoint: str | None = Field(
        default=None, description="https://HOST:6443; default: the first control plane's"
    )
    version_contract: str = Field(default="0.1", alias="versionContract")
    basalt_version: str | None = Field(default=None, alias="basaltVersion")
    control_plane: ControlPlane = Field(alias="controlPlane")
    workers: list[WorkerSet] = Field(default_factory=list)
    patches: list[RawPatch] = Field(default_factory=list)
    machines: dict[Annotated[str, AfterValidator(_uuid)], MachinePatches] = Field(
        default_factory=dict
    )
    backup: BackupPolicy | None = None
    updates: UpdatePolicy | None = None

    def worker_set(self, name: str) -> WorkerSet | None:
        return next((w for w in self.workers if w.name == name), None)


@dataclass(frozen=True)
class Template:
    """A parsed template with its text (what export gives back) and source name."""

    spec: ClusterTemplate
    text: str
    source: str

    def patches(self, raw: list[RawPatch], where: str) -> list[Patch]:
        return [to_patch(p, f"{self.source}: {where}[{i}]") for i, p in enumerate(raw)]

    def cluster_patches(self) -> list[Patch]:
        return self.patches(self.spec.patches, "patches")

    def set_patches(self, role: str, machine_set: str) -> list[Patch]:
        if role == "controlplane":
            return self.patches(self.spec.control_plane.patches, "controlPlane.patches")
        index, workers = next(
            ((i, w) for i, w in enumerate(self.spec.workers) if w.name == machine_set),
            (0, None),
        )
        if workers is None:
            return []
        return self.patches(workers.patches, f"workers[{index}].patches")

    def machine_patches(self, uuid: str) -> list[Patch]:
        own = self.spec.machines.get(uuid)
        return self.patches(own.patches, f"machines.{uuid}.patches") if own else []


def to_patch(raw: RawPatch, source: str) -> Patch:
    """A template's patch entry as the Patch ``gen config`` would load from a file."""
    text = raw if isinstance(raw, str) else patch_text(raw)
    return parse_patch(text, source)


def patch_text(raw: RawPatch) -> str:
    """The file ``export`` writes for a patch entry (``gen config --config-patch @file``)."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, dict) and "documents" in raw and len(raw) == 1:
        return yaml.safe_dump_all(raw["documents"], sort_keys=False)
    return yaml.safe_dump(raw, sort_keys=False)


def parse_template(text: str, source: str = "cluster.yaml") -> Template:
    """Parse and check a template; every problem is listed with its field path and line."""
    documents = parse_documents(text, source)
    if len(documents) != 1 or not isinstance(documents[0].data, dict):
        raise TemplateError(
            f"{source}: a cluster template is one YAML mapping (found {len(documents)} documents)",
            hint=f"start it with 'apiVersion: {API_VERSION}' and 'kind: Cluster'",
        )
    raw = documents[0]
    try:
        spec = ClusterTemplate.model_validate(raw.data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(p for p in error["loc"] if not str(p).startswith(("function-", "dict[")))
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(
                Problem(
                    "Cluster",
                    format_path(loc),
                    message,
                    source=source,
                    line=raw.line_of(loc),
                )
            )
        raise ConfigValidationError(problems, source=source) from None
    names = [w.name for w in spec.workers]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TemplateError(
            f"{source}: Cluster.workers: the set name {duplicates[0]!r} is used twice",
            hint="give each worker set its own name",
        )
    template = Template(spec, text, source)
    # Patches must at least parse; whether they validate is checked when configs render.
    template.cluster_patches()
    template.set_patches("controlplane", "")
    for worker in spec.workers:
        template.set_patches("worker", worker.name)
    for uuid in spec.machines:
        template.machine_patches(uuid)
    return template


def template_dict(value: Any) -> dict[str, Any]:
    """Parsed YAML of a stored template (for listings)."""
    loaded = yaml.safe_load(value) if isinstance(value, str) else value
    return loaded if isinstance(loaded, dict) else {}
