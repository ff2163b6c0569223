"""A QEMU node behind NAT enrols with Basalt Fleet from maintenance mode.

The guest is on QEMU's user network with no port forward at all: nothing on the host
can reach it. Its kernel command line carries ``basalt.fleet=URL`` naming the fleet at
10.0.2.2 (the host's loopback as the guest sees it). The machine enrols, dials its link,
reports its inventory, and the fleet reaches the node's own maintenance API through the
link (``basaltctl fleet version``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from basalt.imager.qemu import free_port
from tests.fakes.fleet import FleetProcess
from tests.vm.conftest import Timings
from tests.vm.machine import Vm, _launch

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_a_node_behind_nat_enrols_and_is_managed_through_its_link(
    image_dir: Path, tmp_path: Path, timings: Timings
) -> None:
    from basalt.imager.qemu import direct_kernel_command

    port = free_port()
    fleet = FleetProcess(
        tmp_path / "fleet", "127.0.0.1", port, tmp_path / "fleet.log", ("--advertise", "10.0.2.2")
    )
    fleet.start()
    vm: Vm | None = None
    try:
        fleet.login()
        url = fleet.ctl("fleet", "token", "create", "--uses", "1").stdout.strip()
        assert url.startswith(f"https://10.0.2.2:{port}/?token=")
        argv = direct_kernel_command(image_dir, 0, machine="q35", cpus=2,
                                     extra_cmdline=f"basalt.fleet={url}")  # fmt: skip
        netdev = argv.index("-netdev") + 1
        argv[netdev] = "user,id=n0"  # no hostfwd: the host cannot dial the guest
        assert "hostfwd" not in " ".join(argv)
        console = tmp_path / "console.log"
        vm = Vm(argv, console, 0, *_launch(argv, console))
        deadline = time.monotonic() + 300
        rows: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            rows = [r for r in fleet.machines() if r["connected"]]
            if rows:
                break
            assert vm.process.poll() is None, vm.console_tail()
            time.sleep(2)
        assert rows, f"no link after 300 s:\n{vm.console_tail()}\n{fleet.log.read_text()[-3000:]}"
        timings.record("q35 behind NAT: QEMU start -> fleet link up", vm.elapsed())
        machine = rows[0]
        inventory = machine["inventory"]
        assert isinstance(inventory, dict)
        assert inventory["stage"] == "maintenance" and not inventory.get("configured")
        assert any(d["name"] == "vda" for d in inventory.get("disks", []))
        version = fleet.ctl("fleet", "version", str(machine["uuid"])).stdout
        assert "maintenance" in version
        assert "enrolled with the fleet" in vm.console_text()
    finally:
        if vm is not None:
            vm.stop()
        fleet.stop()
