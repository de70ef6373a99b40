"""Shape one server's port on loopback with ``tc`` HTB, and always take the shaping off again.

The origin sends through a slow HTB class (``sport ORIGIN_PORT``); everything else on ``lo`` takes a
100 Gbit/s default class, i.e. is not shaped at all. Only the server-to-client direction is matched,
which is the direction blob bytes travel; uploads to the origin pay only for their ACKs.

The root qdisc of ``lo`` belongs to the whole machine, so :class:`LoopbackShaper` refuses to replace
one it did not install, and removes its own on exit, on an exception, on Ctrl-C and (through
``atexit``) when the interpreter exits; the caller turns SIGTERM into a cancellation so that path runs.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

DEVICE = "lo"
_RATE_RE = re.compile(r"^(?P<number>\d+(?:\.\d+)?)(?P<unit>bit|kbit|mbit|gbit)$")
# tc's units are decimal: "100mbit" is 100 * 10**6 bit/s.
_UNIT_BITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
# HTB derives each class's quantum from rate / r2q and warns when that exceeds 200,000 bytes; a fixed
# quantum of one loopback super-packet (64 KiB GSO) keeps the scheduler fair without the warning.
_QUANTUM = "65536"
_WAIT_POLL_SECONDS = 5.0


class ShapingError(RuntimeError):
    """tc is missing, we are not root, ``lo`` already has a qdisc, or a tc command failed."""


def parse_rate(rate: str) -> int:
    """Bits per second of a tc rate such as ``100mbit`` (decimal units, as tc reads them)."""
    match = _RATE_RE.match(rate.strip().lower())
    if match is None:
        raise ValueError(f"rate {rate!r} is not <number><bit|kbit|mbit|gbit>, e.g. 100mbit")
    return int(float(match["number"]) * _UNIT_BITS[match["unit"]])


def _tc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tc", *args], capture_output=True, text=True, check=False)


def foreign_qdiscs(device: str = DEVICE) -> list[str]:
    """The qdiscs on ``device`` other than the kernel's default (``noqueue`` at the root)."""
    shown = _tc("qdisc", "show", "dev", device)
    if shown.returncode != 0:
        raise ShapingError(f"tc qdisc show dev {device} failed: {shown.stderr.strip()}")
    return [line for line in shown.stdout.splitlines() if line.strip() and not line.startswith("qdisc noqueue 0: root")]


class LoopbackShaper:
    """Limit what ``port`` sends on loopback to ``rate`` (a tc rate) while the context is open."""

    def __init__(self, port: int, rate: str, device: str = DEVICE) -> None:
        parse_rate(rate)  # Reject a bad rate before touching the machine.
        self.port = port
        self.rate = rate
        self.device = device
        self.installed = False

    def commands(self) -> list[list[str]]:
        """The tc commands that install the shaping, in order (without the leading ``tc``)."""
        dev = ["dev", self.device]
        return [
            ["qdisc", "add", *dev, "root", "handle", "1:", "htb", "default", "10"],
            ["class", "add", *dev, "parent", "1:", "classid", "1:10", "htb", "rate", "100gbit", "quantum", _QUANTUM],
            ["class", "add", *dev, "parent", "1:", "classid", "1:20", "htb", "rate", self.rate, "quantum", _QUANTUM],
            [
                "filter", "add", *dev, "protocol", "ip", "parent", "1:", "prio", "1",
                "u32", "match", "ip", "sport", str(self.port), "0xffff", "flowid", "1:20",
            ],
        ]  # fmt: skip

    @staticmethod
    def preflight() -> None:
        """Fail now, not minutes into a run, when shaping is impossible here (no tc, not root)."""
        if shutil.which("tc") is None:
            raise ShapingError("tc not found (Debian package iproute2); or run with --no-shape")
        if os.geteuid() != 0:
            raise ShapingError("shaping with tc needs root; or run with --no-shape")

    def install(
        self,
        wait_seconds: float = 0.0,
        on_wait: Callable[[list[str]], None] | None = None,
        abandon: threading.Event | None = None,
    ) -> None:
        """Install the qdisc, its classes and the filter.

        Never replaces a qdisc someone else put on ``lo`` (other benchmarks on this machine shape it
        too): waits up to ``wait_seconds`` for it to go, then refuses; setting ``abandon`` ends the wait.
        """
        abandon = abandon or threading.Event()
        self.preflight()
        deadline = time.monotonic() + wait_seconds
        while existing := foreign_qdiscs(self.device):
            if time.monotonic() >= deadline:
                raise ShapingError(
                    f"{self.device} already has a qdisc, refusing to replace it (someone else's shaping?): "
                    + "; ".join(existing)
                )
            if on_wait is not None:
                on_wait(existing)
            if abandon.wait(_WAIT_POLL_SECONDS):
                raise ShapingError("abandoned while waiting for lo")
        root, *rest = self.commands()
        result = _tc(*root)
        if result.returncode != 0:
            # Nothing of ours is installed (another root qdisc won the race, or tc refused): remove nothing.
            raise ShapingError(f"tc {' '.join(root)} failed: {result.stderr.strip()}")
        # Registered once the root qdisc is ours: from here on it is removed on every way out.
        self.installed = True
        atexit.register(self.remove)
        for command in rest:
            result = _tc(*command)
            if result.returncode != 0:
                self.remove()
                raise ShapingError(f"tc {' '.join(command)} failed: {result.stderr.strip()}")

    def remove(self) -> None:
        """Delete the root qdisc we installed (idempotent; never touches one we did not install)."""
        if not self.installed:
            return
        self.installed = False
        atexit.unregister(self.remove)
        result = _tc("qdisc", "del", "dev", self.device, "root")
        if result.returncode != 0 and foreign_qdiscs(self.device):
            raise ShapingError(
                f"could not remove the shaping: {result.stderr.strip()}; run `tc qdisc del dev {self.device} root`"
            )

    def intact(self) -> bool:
        """Whether our filter is still in place (someone else's cleanup may have deleted the root qdisc)."""
        if not self.installed:
            return False
        # u32 shows "match ip sport P 0xffff" as the port in the high half of the word at offset 20.
        return f"match {self.port:04x}0000/ffff0000 at 20" in _tc("filter", "show", "dev", self.device).stdout

    def stats(self) -> str:
        """``tc -s class show``: bytes and drops per class, for the record."""
        return _tc("-s", "class", "show", "dev", self.device).stdout

    def __enter__(self) -> Self:
        self.install()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
