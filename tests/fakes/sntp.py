"""An SNTP server on a loopback address for unit tests: answers from a clock that is
``skew`` seconds ahead of the host's, or misbehaves as told (kiss code, wrong originate,
unsynchronised, silence)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from basalt.machinery import sntp


@dataclass
class FakeSntpServer:
    host: str
    skew: float = 0.0
    port_wanted: int = 0
    #: "" (answer), "kiss", "wrong-origin", "unsynced", "silent"
    behaviour: str = ""
    stratum: int = 2
    requests: int = 0
    _sock: socket.socket = field(init=False)
    _thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((self.host, self.port_wanted))
        self._sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        port: int = self._sock.getsockname()[1]
        return port

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            self.requests += 1
            received = time.time() + self.skew
            if self.behaviour == "silent" or len(data) < sntp.PACKET_SIZE:
                continue
            origin = struct.unpack_from("!Q", data, 40)[0]
            if self.behaviour == "wrong-origin":
                origin ^= 1 << 20
            leap, stratum, ref = 0, self.stratum, b"\x7f\x00\x00\x01"
            if self.behaviour == "kiss":
                stratum, ref = 0, b"RATE"
            elif self.behaviour == "unsynced":
                leap = 3
            answer = struct.pack(
                "!BBbbII4sQQQQ",
                (leap << 6) | (4 << 3) | 4,
                stratum,
                6,
                -20,
                0,
                0,
                ref,
                sntp.to_ntp(received),
                origin,
                sntp.to_ntp(received),
                sntp.to_ntp(time.time() + self.skew),
            )
            self._sock.sendto(answer, peer)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=2)
