"""``basalt.profile=1``: PID 1's start-up under cProfile, printed when its API opens, and
bench/boot's reading of it off the console."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path

from basalt.machined import main

_BENCH = Path(__file__).resolve().parents[2] / "bench" / "boot.py"
_SPEC = importlib.util.spec_from_file_location("bench_boot", _BENCH)
assert _SPEC is not None and _SPEC.loader is not None
boot_bench = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_boot"] = boot_bench  # its dataclasses look their module up
_SPEC.loader.exec_module(boot_bench)


def _work() -> int:
    return sum(i * i for i in range(2000))


def test_only_the_kernel_argument_starts_a_profile(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text("console=ttyS0 basalt.profile=10 quiet\n")
    assert main.startup_profile(str(cmdline)) is None
    assert main.startup_profile(str(tmp_path / "absent")) is None
    cmdline.write_text("console=ttyS0 basalt.profile=1 quiet\n")
    profile = main.startup_profile(str(cmdline))
    assert profile is not None
    try:
        _work()
    finally:
        profile.disable()
    out = io.StringIO()
    main.print_profile(profile, out)
    console = f"[ 1.0] machined: INFO x: boot\n{out.getvalue()}[ 2.0] machined: INFO y: more\n"
    printed = boot_bench.startup_profile(console)
    assert "_work" in printed and "cumulative" in printed and "tottime" in printed
    assert "machined profile" not in printed
    assert boot_bench.startup_profile("no markers").startswith("no profile on the console")
