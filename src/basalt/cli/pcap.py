"""``basaltctl pcap``: capture packets on one node's interface into a pcap file.

The filter is compiled here (basalt.machinery.bpf), so a filter that does not compile is
refused before anything is sent; the node runs the program on its raw socket and streams
a pcap file, which is written as it comes (``-o -``: to stdout, for ``tcpdump -r -``).
The output file is created only when the node has started capturing, so a refused call
leaves nothing behind.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated

import typer

from ._api import EndpointsOption, NodeFailures, NodesOption, run
from ._common import info

if TYPE_CHECKING:
    from basalt.machinery.bpf import Instruction
    from basalt.machinery.client.client import Client

_HEADER_BYTES = 24
_RECORD = struct.Struct("<IIII")


def count_records(chunk: bytes) -> int:
    """The pcap records in a chunk of whole records (every chunk after the header)."""
    count, at = 0, 0
    while at + _RECORD.size <= len(chunk):
        at += _RECORD.size + _RECORD.unpack_from(chunk, at)[2]
        count += 1
    return count


def _program(bpf_filter: str | None, bpf_raw: str | None, snaplen: int) -> list[Instruction]:
    from basalt.machinery import bpf
    from basalt.machinery.errors import BasaltError

    if bpf_filter is not None and bpf_raw is not None:
        raise BasaltError(
            "--bpf-filter and --bpf-raw both given", hint="give the filter one way, not both"
        )
    bpf.check_snaplen(snaplen)
    if bpf_raw is not None:
        return bpf.parse_raw(bpf_raw)
    if bpf_filter is None or not bpf_filter.strip():
        return []
    return bpf.compile_filter(bpf_filter, snaplen)


def _seconds(duration: str | None) -> float:
    from basalt.machinery.durations import parse_duration
    from basalt.machinery.errors import BasaltError

    if duration is None:
        return 0.0
    seconds = parse_duration(duration)
    if seconds is None or seconds <= 0:
        raise BasaltError(
            f"--duration {duration!r} is not a duration",
            hint="give a duration such as 10s, 2m or 1h (at most 1h)",
        )
    return seconds


class _Output:
    """The pcap file, opened at the first chunk (so a refused capture creates nothing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stream: IO[bytes] | None = None
        self.packets = 0
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self.stream is None:
            if self.path == "-":
                self.stream = sys.stdout.buffer
            else:
                self.stream = Path(self.path).open("wb")  # noqa: SIM115 (closed in close())
                Path(self.path).chmod(0o600)  # packets may carry secrets
        else:
            self.packets += count_records(chunk)
        self.stream.write(chunk)
        self.stream.flush()
        self.size += len(chunk)

    def reader_gone(self) -> None:
        """stdout's reader closed the pipe: further writes (and the flush at exit) go
        nowhere instead of failing."""
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)

    def close(self) -> None:
        if self.stream is not None and self.stream is not sys.stdout.buffer:
            self.stream.close()


def pcap(
    ctx: typer.Context,
    interface: Annotated[
        str, typer.Option("-i", "--interface", help="Interface on the node (eth0, lo, ...).")
    ],
    output: Annotated[
        str, typer.Option("-o", "--output", help="The pcap file to write; '-': stdout.")
    ],
    bpf_filter: Annotated[
        str | None,
        typer.Option(
            "--bpf-filter",
            help="A filter in the pcap-filter subset of docs/toolbox.md (e.g. 'udp port 53').",
        ),
    ] = None,
    bpf_raw: Annotated[
        str | None,
        typer.Option("--bpf-raw", help="A classic BPF program as 'tcpdump -ddd' prints it."),
    ] = None,
    promiscuous: Annotated[
        bool, typer.Option("--promiscuous", help="Also frames not addressed to the node.")
    ] = False,
    snaplen: Annotated[int, typer.Option("--snaplen", help="Bytes kept of each packet.")] = 65535,
    duration: Annotated[
        str | None,
        typer.Option("--duration", help="Stop after this long (10s, 5m; default: Ctrl-C, 1h)."),
    ] = None,
    count: Annotated[
        int, typer.Option("--count", min=0, help="Stop after this many packets (0: no limit).")
    ] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite the output file.")] = False,
    show_program: Annotated[
        bool,
        typer.Option("--show-program", help="Print the compiled filter (-ddd form) and exit."),
    ] = False,
    nodes: NodesOption = None,
    endpoints: EndpointsOption = None,
) -> None:
    """Capture packets on one node's interface into a pcap file (tcpdump, Wireshark)."""
    from basalt.machinery.bpf import format_program

    from ._common import refuse_overwrite

    program = _program(bpf_filter, bpf_raw, snaplen)  # refused before any call
    seconds = _seconds(duration)
    if show_program:
        print(format_program(program) if program else "(no filter: every packet)")
        return
    if output != "-":
        refuse_overwrite([Path(output)], force)
    out = _Output(output)

    async def work(client: Client, failures: NodeFailures) -> None:
        from basalt.machinery.api import machine_pb2
        from basalt.machinery.errors import BasaltError

        if len(client.nodes) > 1:
            raise BasaltError(
                f"pcap captures on one node at a time; {len(client.nodes)} are targeted",
                hint="name one node with -n NODE",
            )
        request = machine_pb2.PacketCaptureRequest(
            interface=interface,
            promiscuous=promiscuous,
            snap_len=snaplen,
            bpf_filter=[
                machine_pb2.BPFInstruction(op=i[0], jt=i[1], jf=i[2], k=i[3]) for i in program
            ],
            duration_seconds=seconds,
            max_packets=count,
        )
        async for chunk in client.machine.PacketCapture(request, metadata=client.metadata()):
            if chunk.metadata.error:
                failures.report(chunk.metadata.node, chunk.metadata.error, chunk.metadata.code)
                continue
            if out.stream is None:
                where = f"{chunk.metadata.node}:{interface}" if chunk.metadata.node else interface
                info(f"capturing on {where}" + (" (Ctrl-C to stop)" if not seconds else ""))
            try:
                out.write(chunk.bytes)
            except BrokenPipeError:  # the reader went away (| tcpdump -c 5): done
                out.reader_gone()
                return

    try:
        run(ctx, work, nodes=nodes, endpoints=endpoints)
    except KeyboardInterrupt:
        pass  # Ctrl-C is the ordinary end of an open-ended capture; the file is whole
    finally:
        out.close()
        if out.stream is not None:
            target = "stdout" if output == "-" else output
            info(f"{out.packets} packets ({out.size} bytes) written to {target}")
