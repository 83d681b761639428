"""Child processes of the local stack, the demo and the tests: free ports, waiting for readiness, stopping.

One way to wait (`wait_until`: a deadline, a clear TimeoutError naming what did not happen, and the
child's log tail if it died while starting) and one way to stop (`stop_process`: SIGTERM, a grace
period, then SIGKILL) for every process the project starts.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


# Ports handed out by this process. A port is free when we check it and is bound only later by the
# child we start, so without this record two calls could return the same port (or a port inside a
# block) and the second server dies with "address in use" (CI, stop 24: Tansu got a SeaweedFS port).
_HANDED_OUT: set[int] = set()
# Ports below the kernel's ephemeral range, where outgoing connections never take a port between our
# check and the child's bind.
_LOW, _HIGH = 20000, 32000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _pick_range() -> tuple[int, int]:
    eph_low, eph_high = _ephemeral_range()
    if eph_low > _HIGH:
        return _LOW, _HIGH
    if eph_high < 64000:
        return eph_high + 1, 65500  # the ephemeral range sits low: pick above it
    return 1024, 65500  # it covers everything: no port is safe from outgoing connections; pick any


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(count: int) -> int:
    """First of `count` consecutive ports that are free now and not handed out before by this process.

    Picked at random outside the kernel's ephemeral range, so parallel test processes rarely try the
    same port and no outgoing connection can take one before the server we start binds it.
    """
    low, high = _pick_range()
    rng = random.SystemRandom()
    for _ in range(500):
        base = rng.randrange(low, high - count)
        block = range(base, base + count)
        if any(port in _HANDED_OUT for port in block) or not all(_bindable(port) for port in block):
            continue
        _HANDED_OUT.update(block)
        return base
    raise RuntimeError(f"no block of {count} free ports found on 127.0.0.1 in {low}..{high}")


def free_port() -> int:
    """A port that is free now and not handed out before by this process (see `free_port_block`)."""
    return free_port_block(1)


def stop_process(proc: subprocess.Popen | None, grace_s: float = 60) -> int | None:
    """SIGTERM a child we started, wait up to `grace_s`, then SIGKILL; returns its exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return proc.returncode


def wait_until(
    check: Callable[[], T],
    timeout_s: float,
    what: str,
    *,
    every_s: float = 0.25,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
    progress: Callable[[], object] | None = None,
    diag: Callable[[], str] | None = None,
) -> T:
    """Call `check` until it returns a truthy value and return that value.

    A `check` that raises counts as "not yet" (its last error is reported on timeout). With `proc`,
    a child that exits while we wait fails at once with its log tail. `progress` runs between tries
    (the demo prints where it is); `diag` adds diagnostics to the timeout message.
    """
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            hint = ""
            if any(sign in tail.lower() for sign in ("addrinuse", "address already in use", "address in use")):
                hint = " (a port it listens on is taken by another process: stop that process or choose free ports)"
            raise RuntimeError(
                f"{what}: the process exited with code {proc.returncode} while starting{hint}; log tail:\n{tail}"
            )
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - any failure of the check means "not ready yet"
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            where = f"; see {log}" if log else ""
            extra = f"\n{diag()}" if diag else ""
            raise TimeoutError(f"{what} did not happen within {timeout_s:.0f} s{detail}{where}{extra}")
        if progress is not None:
            progress()
        time.sleep(every_s)
