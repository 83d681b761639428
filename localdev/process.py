"""Child processes of the local stack, the demo and the tests: free ports, waiting for readiness, stopping.

One way to wait (`wait_until`: a deadline, a clear TimeoutError naming what did not happen, and the
child's log tail if it died while starting) and one way to stop (`stop_process`: SIGTERM, a grace
period, then SIGKILL) for every process the project starts.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_block(count: int) -> int:
    """First port of `count` consecutive ports that are free right now."""
    for _ in range(200):
        base = free_port()
        if base + count >= 65535:
            continue
        try:
            socks = []
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no block of {count} free ports found on 127.0.0.1")


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
            raise RuntimeError(
                f"{what}: the process exited with code {proc.returncode} while starting; log tail:\n{tail}"
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
