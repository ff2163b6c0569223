"""The ESP repair plan over every torn state a power cut leaves, and over every state
the repair itself leaves when it is cut (table-driven, on a small FAT model).

The model holds each file's clusters and which clusters the FAT counts as free. Its two
operations do what the real ones do: ``erase`` removes a name and nothing else
(:meth:`FatVolume.erase`); ``unlink`` (vfat) also frees the file's clusters, and the
model records it as damage when they belonged to another name too or were free
already. For each starting state the plan is carried out with a cut after every step
(0 .. all), then planned again from what the cut left and finished; every path must end
in the same state, with no damage, and with systemd-boot's choice of entry unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from basalt.machined.boot.esp_repair import (
    EspFile,
    EspPlan,
    How,
    Removal,
    managed,
    plan,
    unbootable,
)
from basalt.machinery.boot import SlotName, loader_order

A, B = SlotName.A, SlotName.B
ENTRIES = "loader/entries"


def _text(slot: str) -> str:
    where = f"/EFI/basalt/{slot.upper()}"
    return f"title Basalt\nlinux {where}/vmlinuz\ninitrd {where}/initrd.img\noptions x\n"


@dataclass
class Esp:
    """Paths -> (clusters, size, text); ``free``: clusters the FAT counts as free."""

    files: dict[str, tuple[frozenset[int], int, str | None]]
    free: set[int] = field(default_factory=set)
    damage: list[str] = field(default_factory=list)

    def copy(self) -> Esp:
        return Esp(dict(self.files), set(self.free))

    def seen(self) -> list[EspFile]:
        out = []
        for path, (clusters, size, text) in self.files.items():
            shared = ()
            if managed(path):
                shared = tuple(
                    sorted(p for p, (c, _, _) in self.files.items() if p != path and c & clusters)
                )
            problem = None
            if clusters & self.free:
                problem = f"cluster {min(clusters & self.free)} is marked free in the FAT"
            elif size and not clusters:
                problem = f"{size} bytes but no first cluster"
            out.append(EspFile(path, size, shared, problem, text))
        return out

    def apply(self, removal: Removal) -> None:
        clusters, _, _ = self.files.pop(removal.path)
        if removal.how is How.UNLINK:
            if clusters & self.free:
                self.damage.append(f"{removal.path}: freed a free cluster (remount read-only)")
            for other, (theirs, _, _) in self.files.items():
                if theirs & clusters:
                    self.damage.append(f"{removal.path}: freed clusters of {other}")
            self.free |= clusters

    def boots(self) -> str | None:
        """The entry systemd-boot boots: the first bootable one in its order."""
        seen = {f.name: f for f in self.seen() if f.directory == ENTRIES}
        paths = {p.lower() for p in self.files}
        bootable = [n for n in loader_order(seen) if unbootable(seen[n], paths) is None]
        return bootable[0] if bootable else None


def _steps(done: EspPlan) -> list[Removal]:
    """In the order MetalSlots.repair makes them: erasures on the device, then unlinks."""
    return [*done.erasures, *done.unlinks]


def _kernels(*slots: str, base: int = 100) -> dict[str, tuple[frozenset[int], int, None]]:
    files = {}
    for i, slot in enumerate(slots):
        for j, name in enumerate(("vmlinuz", "initrd.img")):
            first = base + 10 * (2 * i + j)
            files[f"EFI/basalt/{slot}/{name}"] = (frozenset(range(first, first + 3)), 1500, None)
    return files


def _entry(name: str, *clusters: int, text: str | None = None, size: int = 80) -> tuple:
    slot = name.split("-")[2]
    if not clusters:
        return frozenset(), 0, ""
    return frozenset(clusters), size, _text(slot) if text is None else text


def esp(entries: dict[str, tuple], extra: dict[str, tuple] | None = None) -> Esp:
    """Entries by name, both slots' kernel and initrd, and ``extra`` files by path."""
    files = {f"{ENTRIES}/{name}": spec for name, spec in entries.items()}
    files.update(_kernels("A", "B"))
    files.update(extra or {})
    return Esp(files)


A1 = "basalt-1-a-0.1.0.conf"
B2 = "basalt-2-b-0.2.0.conf"


@dataclass(frozen=True)
class Case:
    name: str
    start: Esp
    booted: SlotName
    #: the paths the repair removes (a cut anywhere must end with exactly these gone)
    removed: frozenset[str]
    left: int = 0
    free: frozenset[int] = frozenset()  # clusters marked free before the repair


def _case(
    name: str,
    start: Esp,
    booted: SlotName,
    removed: set[str],
    left: int = 0,
    free: set[int] | None = None,
) -> Case:
    if free:
        start.free |= free
    return Case(name, start, booted, frozenset(removed), left)


CASES = [
    _case("clean: nothing to do", esp({A1: _entry(A1, 1), B2: _entry(B2, 2)}), A, set()),
    _case(
        "firmware counting B+3 -> +2-1 cut: both names, one chain; +3 sorts first",
        esp({A1: _entry(A1, 1), "basalt-2-b-0.2.0+3.conf": _entry(B2, 2),
             "basalt-2-b-0.2.0+2-1.conf": _entry(B2, 2)}),
        B,
        {f"{ENTRIES}/basalt-2-b-0.2.0+2-1.conf"},
    ),
    _case(
        "mark good of B (+1-2 -> plain) cut after the new name was written whole",
        esp({A1: _entry(A1, 1), "basalt-2-b-0.2.0+1-2.conf": _entry(B2, 2), B2: _entry(B2, 2)}),
        B,
        {f"{ENTRIES}/{B2}"},
    ),
    _case(
        "mark good of B cut after Linux created the new name, before its clusters",
        esp({A1: _entry(A1, 1), "basalt-2-b-0.2.0+1-2.conf": _entry(B2, 2), B2: _entry(B2)}),
        B,
        {f"{ENTRIES}/{B2}"},
    ),
    _case(
        "a counted name of A, still empty, sorts first: systemd-boot skips it",
        esp({"basalt-1-a-0.1.0+3.conf": _entry(A1), A1: _entry(A1, 1), B2: _entry(B2, 2)}),
        A,
        {f"{ENTRIES}/basalt-1-a-0.1.0+3.conf"},
    ),
    _case(
        "rollback rename A gen 1 -> gen 3 cut: both names; gen 3 sorts first",
        esp({A1: _entry(A1, 1), "basalt-3-a-0.1.0.conf": _entry(A1, 1), B2: _entry(B2, 2)}),
        A,
        {f"{ENTRIES}/{A1}"},
    ),
    _case(
        "install into B cut while writing its kernel: a temporary file of its own",
        esp({A1: _entry(A1, 1)}, {"EFI/basalt/B/.vmlinuz.x1": (frozenset({7, 8}), 900, None)}),
        A,
        {"EFI/basalt/B/.vmlinuz.x1"},
    ),
    _case(
        "install into B: the kernel's rename over the old one cut: temp and name share",
        esp({A1: _entry(A1, 1)},
            {"EFI/basalt/B/.vmlinuz.x1": (frozenset({120, 121, 122}), 1500, None)}),
        A,
        {"EFI/basalt/B/.vmlinuz.x1"},
    ),
    _case(
        "install into B: its entry's temporary file, never renamed",
        esp({A1: _entry(A1, 1)},
            {"loader/entries/.basalt.x": (frozenset({9}), 80, _text("b"))}),
        A,
        {f"{ENTRIES}/.basalt.x"},
    ),
    _case(
        "install into B (A booted, rolled back to): B's old entry's removal cut after the "
        "FAT freed its cluster",
        esp({"basalt-3-a-0.1.0.conf": _entry(A1, 1), B2: _entry(B2, 2)}),
        A,
        {f"{ENTRIES}/{B2}"},
        free={2},
    ),
    _case(
        "install into B: the replaced kernel's old chain freed, its name still there",
        esp({A1: _entry(A1, 1)}),
        A,
        {"EFI/basalt/B/vmlinuz"},
        free={120},
    ),
    _case(
        "the booted slot's kernel has a free cluster: left alone, reported",
        esp({A1: _entry(A1, 1), B2: _entry(B2, 2)}),
        A,
        set(),
        left=1,
        free={100},
    ),
    _case(
        "the booted slot's entry has a free cluster: left alone, reported",
        esp({A1: _entry(A1, 1)}),
        A,
        set(),
        left=1,
        free={1},
    ),
    _case(
        "B's kernel shares clusters with B's initrd while B has an entry: left alone",
        esp({A1: _entry(A1, 1), B2: _entry(B2, 2)},
            {"EFI/basalt/B/vmlinuz": (frozenset({130, 131}), 1000, None)}),
        A,
        set(),
        left=2,
    ),
    _case(
        "two names, one of them has no kernel: the bootable one stays whatever the order",
        esp({"basalt-2-b-0.2.0+3.conf": _entry(B2, 5, text="linux /EFI/basalt/B/gone\n"),
             "basalt-2-b-0.2.0+2-1.conf": _entry(B2, 2), A1: _entry(A1, 1)}),
        B,
        {f"{ENTRIES}/basalt-2-b-0.2.0+3.conf"},
    ),
    _case(
        "several at once: a torn B rename, a temp kernel, an A temp entry",
        esp({A1: _entry(A1, 1), "basalt-2-b-0.2.0+3.conf": _entry(B2, 2),
             "basalt-2-b-0.2.0+2-1.conf": _entry(B2, 2)},
            {"EFI/basalt/A/.initrd.img.q": (frozenset({110, 111, 112}), 1500, None),
             "loader/entries/.basalt.y": (frozenset({3}), 80, _text("a"))}),
        B,
        {f"{ENTRIES}/basalt-2-b-0.2.0+2-1.conf", "EFI/basalt/A/.initrd.img.q",
         f"{ENTRIES}/.basalt.y"},
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_repair_ends_in_one_state_whatever_step_it_is_cut_at(case: Case) -> None:
    first = plan(case.start.seen(), case.booted)
    assert {r.path for r in first.removals} == case.removed
    assert len(first.left) == case.left, first.left
    steps = _steps(first)
    before = case.start.boots()
    finals = []
    for cut in range(len(steps) + 1):
        model = case.start.copy()
        for removal in steps[:cut]:
            model.apply(removal)
            assert model.boots() == before, f"cut after {removal.path}: another entry boots"
        rest = plan(model.seen(), case.booted)  # the next boot's repair
        for removal in _steps(rest):
            model.apply(removal)
            assert model.boots() == before
        assert model.damage == []
        again = plan(model.seen(), case.booted)
        assert again.removals == () and len(again.left) == case.left  # idempotent
        finals.append(sorted(model.files))
    assert all(f == finals[0] for f in finals)
    assert set(case.start.files) - set(finals[0]) == case.removed


def test_shared_or_broken_names_are_erased_and_the_rest_unlinked() -> None:
    model = esp(
        {A1: _entry(A1, 1), "basalt-2-b-0.2.0+3.conf": _entry(B2, 2),
         "basalt-2-b-0.2.0+2-1.conf": _entry(B2, 2), "basalt-2-b-0.2.0+1-2.conf": _entry(B2)},
        {"EFI/basalt/B/.vmlinuz.x": (frozenset({7}), 500, None)},
    )  # fmt: skip
    done = plan(model.seen(), B)
    how = {r.path.rpartition("/")[2]: r.how for r in done.removals}
    assert how == {
        "basalt-2-b-0.2.0+2-1.conf": How.ERASE,  # shares the chain of the +3 that stays
        "basalt-2-b-0.2.0+1-2.conf": How.UNLINK,  # empty: owns nothing
        ".vmlinuz.x": How.UNLINK,  # its own clusters: freed
    }


def test_messages_name_the_file_what_stays_and_why() -> None:
    model = esp(
        {A1: _entry(A1, 1), "basalt-2-b-0.2.0+3.conf": _entry(B2, 2),
         "basalt-2-b-0.2.0+2-1.conf": _entry(B2, 2)}
    )  # fmt: skip
    (removal,) = plan(model.seen(), B).removals
    assert removal.message() == (
        "removed loader/entries/basalt-2-b-0.2.0+2-1.conf: a second name for slot b's boot "
        "entry, left by an interrupted rename; basalt-2-b-0.2.0+3.conf stays, the one "
        "systemd-boot boots; it shares clusters with loader/entries/basalt-2-b-0.2.0+3.conf "
        "(erased from its directory, its clusters not freed)"
    )
    left = esp({A1: _entry(A1, 1)})
    left.free.add(101)
    assert plan(left.seen(), A).left == (
        "EFI/basalt/A/vmlinuz: cluster 101 is marked free in the FAT; left alone: slot a has "
        "a boot entry",
    )


def test_files_outside_basalt_s_directories_are_never_touched() -> None:
    model = esp({A1: _entry(A1, 1)}, {"EFI/BOOT/.x": (frozenset({50}), 80, None)})
    model.files["loader/.random-seed.tmp"] = (frozenset({5}), 32, None)
    done = plan(model.seen(), A)
    assert done.removals == () and done.left == ()
