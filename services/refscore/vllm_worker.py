"""Mixed into vLLM's worker class (LLM(worker_extension_cls=...)) so the service can read back the
settings the computing process really runs with: threads and core binding are decided inside the
worker process, where the front end cannot see them."""

from __future__ import annotations

import os


class SettingsReadback:
    def offdpo_settings(self) -> dict[str, str]:
        import torch

        return {
            "torch_threads": str(torch.get_num_threads()),
            "cpu_cores_bound": ",".join(str(c) for c in sorted(os.sched_getaffinity(0))),
            "cpu_reserved_cores": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", ""),
            "cpu_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""),
            "device": str(getattr(self, "device", "")),
        }
