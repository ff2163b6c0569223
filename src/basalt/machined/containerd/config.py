"""Where containerd keeps things on a node, and the config file machined writes for it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

#: Unix socket paths longer than this do not fit in ``sockaddr_un``.
MAX_SOCKET_PATH = 107

#: On the container platform (a process on a host), machined runs containerd only when
#: this variable is set in its environment (tests and process clusters that want it).
ENABLE_ENV = "BASALT_CONTAINERD"

#: Where the binaries are looked for (the image ships containerd, its shim and runc).
SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ContainerdPaths:
    """containerd's directories, its socket and its config file on one node."""

    root: Path
    state: Path
    config_dir: Path
    logs: Path
    snapshotter: str
    cri: bool
    #: Where the CRI plugin watches for CNI network configs (it creates the directory).
    cni_conf_dir: Path | None = None

    @property
    def socket(self) -> Path:
        return self.state / "containerd.sock"

    @property
    def config(self) -> Path:
        return self.config_dir / "config.toml"

    @classmethod
    def metal(cls, system_root: Path, ephemeral: Path) -> ContainerdPaths:
        """The machine's own: /var/lib/containerd, /run/containerd; overlayfs; CRI on,
        reading CNI configs from /etc/cni/net.d."""
        return cls(
            root=ephemeral / "lib" / "containerd",
            state=system_root / "run" / "containerd",
            config_dir=system_root / "run" / "basalt" / "containerd",
            logs=ephemeral / "log" / "containers",
            snapshotter="overlayfs",
            cri=True,
            # the metal platform mounts a tmpfs on /etc/cni; the CRI creates net.d in it
            cni_conf_dir=system_root / "etc" / "cni" / "net.d",
        )

    @classmethod
    def under(cls, ephemeral: Path) -> ContainerdPaths:
        """Everything below the node's own EPHEMERAL dir (a process on a host).

        The ``native`` snapshotter (copies) works on any host filesystem; the CRI plugin
        stays off: no kubelet runs on a process node, and it would manage host networking.
        """
        return cls(
            root=ephemeral / "lib" / "containerd",
            state=ephemeral / "run" / "containerd",
            config_dir=ephemeral / "run" / "basalt-containerd",
            logs=ephemeral / "log" / "containers",
            snapshotter="native",
            cri=False,
        )

    def check(self) -> None:
        """Refuse paths containerd cannot use, naming the path and what to do."""
        for name, path in (("socket", self.socket), ("ttrpc socket", self.ttrpc_socket)):
            if len(os.fsencode(path)) > MAX_SOCKET_PATH:
                raise ValueError(
                    f"containerd {name} path {str(path)!r} is longer than "
                    f"{MAX_SOCKET_PATH} bytes, which a unix socket cannot use: give the "
                    "node a shorter directory"
                )

    @property
    def ttrpc_socket(self) -> Path:
        return self.state / "containerd.sock.ttrpc"

    def render(self) -> str:
        """containerd's TOML config (version 2)."""

        def q(value: object) -> str:
            text = str(value)
            if any(c in text for c in '"\\\n'):
                raise ValueError(f"containerd path {text!r} contains a quote or backslash")
            return f'"{text}"'

        lines = [
            "# Written by machined; the root filesystem is read-only.",
            "version = 2",
            f"root = {q(self.root)}",
            f"state = {q(self.state)}",
            "oom_score = -999",
        ]
        if not self.cri:
            lines.append('disabled_plugins = ["io.containerd.grpc.v1.cri"]')
        lines += [
            "",
            "[grpc]",
            f"  address = {q(self.socket)}",
            "",
            "[ttrpc]",
            f"  address = {q(self.ttrpc_socket)}",
            "",
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {q(self.root / 'opt')}",
        ]
        if self.cri:
            conf_dir = self.cni_conf_dir or Path("/etc/cni/net.d")
            lines += [
                "",
                '[plugins."io.containerd.grpc.v1.cri"]',
                '  stream_server_address = "127.0.0.1"',
                '[plugins."io.containerd.grpc.v1.cri".cni]',
                '  bin_dir = "/opt/cni/bin"',
                f"  conf_dir = {q(conf_dir)}",
                '[plugins."io.containerd.grpc.v1.cri".containerd]',
                f"  snapshotter = {q(self.snapshotter)}",
                '  default_runtime_name = "runc"',
                '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]',
                '  runtime_type = "io.containerd.runc.v2"',
                '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]',
                "  SystemdCgroup = false",
            ]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        """Create the directories and write the config (blocking; small)."""
        self.check()
        for path in (self.root, self.state, self.config_dir, self.logs):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(self.render())
        tmp.replace(self.config)
