"""A classic BPF interpreter, as the kernel runs socket filters (net/core/filter.c's
semantics): the accumulator A, the index X, 16 scratch words, loads that reject the
packet when they read past its end, and the return value as the bytes to keep (0: drop).

It runs programs from ``basalt.machinery.bpf`` and from ``tcpdump -ddd`` over hand-built
packets, so the compiler's decisions can be checked against tcpdump's.
"""

from __future__ import annotations

from collections.abc import Sequence

Program = Sequence[tuple[int, int, int, int]]

MASK = 0xFFFFFFFF
# classes
LD, LDX, ST, STX, ALU, JMP, RET, MISC = range(8)
# sizes and modes
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND, MEM, LEN, MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
SOURCE_X = 0x08


class BPFError(Exception):
    """A program the kernel would refuse (a bad opcode, a jump out of it)."""


def _read(packet: bytes, offset: int, size: int) -> int | None:
    if offset < 0 or offset + size > len(packet):
        return None
    return int.from_bytes(packet[offset : offset + size], "big")


def _alu(op: int, a: int, operand: int) -> int:
    if op in (0x30, 0x90) and operand == 0:  # div, mod by zero: the kernel returns 0
        raise ZeroDivisionError
    results = {
        0x00: lambda: a + operand,
        0x10: lambda: a - operand,
        0x20: lambda: a * operand,
        0x30: lambda: a // operand,
        0x40: lambda: a | operand,
        0x50: lambda: a & operand,
        0x60: lambda: a << (operand & 31),
        0x70: lambda: a >> (operand & 31),
        0x80: lambda: -a,
        0x90: lambda: a % operand,
        0xA0: lambda: a ^ operand,
    }
    if op not in results:
        raise BPFError(f"unknown ALU operation {op:#x}")
    return results[op]() & MASK


def _jump(op: int, a: int, operand: int) -> bool:
    tests = {0x10: a == operand, 0x20: a > operand, 0x30: a >= operand, 0x40: bool(a & operand)}
    if op not in tests:
        raise BPFError(f"unknown jump {op:#x}")
    return tests[op]


def run(program: Program, packet: bytes) -> int:
    """What the filter returns for ``packet``: the bytes to keep, 0 to drop it."""
    a = x = 0
    memory = [0] * 16
    pc = 0
    sizes = {W: 4, H: 2, B: 1}
    while True:
        if not 0 <= pc < len(program):
            raise BPFError(f"the program runs off its end at {pc}")
        op, jt, jf, k = program[pc]
        pc += 1
        kind = op & 0x07
        if kind in (LD, LDX):
            mode = op & 0xE0
            if kind == LDX and mode == MSH:
                byte = _read(packet, k, 1)
                if byte is None:
                    return 0
                x = 4 * (byte & 0x0F)
                continue
            if mode == IMM:
                value = k
            elif mode == LEN:
                value = len(packet)
            elif mode == MEM:
                value = memory[k & 15]
            elif mode in (ABS, IND) and kind == LD:
                loaded = _read(packet, k + (x if mode == IND else 0), sizes[op & 0x18])
                if loaded is None:
                    return 0  # a load past the end rejects the packet
                value = loaded
            else:
                raise BPFError(f"unknown load {op:#x}")
            if kind == LD:
                a = value & MASK
            else:
                x = value & MASK
        elif kind == ST:
            memory[k & 15] = a
        elif kind == STX:
            memory[k & 15] = x
        elif kind == ALU:
            try:
                a = _alu(op & 0xF0, a, x if op & SOURCE_X else k)
            except ZeroDivisionError:
                return 0
        elif kind == JMP:
            if op & 0xF0 == 0x00:  # ja
                pc += k
            else:
                pc += jt if _jump(op & 0xF0, a, x if op & SOURCE_X else k) else jf
        elif kind == RET:
            source = op & 0x18
            return a if source == 0x10 else k
        elif op & 0xF8 == 0x00:  # MISC: tax
            x = a
        else:  # MISC: txa
            a = x
