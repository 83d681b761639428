"""The judge endpoint: chat completions on any OpenAI-compatible API, through the openai SDK.

Retries are the SDK's own (timeouts, connection errors, 408/409/429 and 5xx; `max_retries` of them, each
attempt bounded by `timeout_s`); only their spacing is this judge's, `backoff_s` doubling up to
`backoff_max_s` with jitter, because the SDK has no public setting for it. With vLLM the verdict is
forced into the allowed labels by structured outputs (`extra_body={"structured_outputs": {"choice":
[...]}}`); other endpoints (`structured_output` off) get the same prompt and the answer is parsed.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import openai

from offdpo.errors import ConfigError
from services.labeler.config import JudgeConfig
from services.labeler.errors import JudgeError, JudgeRefused

# Statuses that refuse this request whatever the judge's state: the set is dead-lettered. Others (401,
# 403, 404: a key or model setting; 429, 5xx, timeouts: the endpoint's state) are outages, retried, and
# the labeler's readiness reports them after OFFDPO_LABELER_OUTAGE_READY_S; no set is lost to them.
_REFUSED_FOR_THIS_REQUEST = (400, 413, 422)

log = logging.getLogger(__name__)


class JudgeClient(Protocol):
    """What the judge strategies need from an endpoint (tests pass fakes with known verdicts)."""

    model: str

    def complete(self, prompt: str, choices: Sequence[str]) -> str:
        """The judge's raw answer to `prompt`; `choices` are the allowed answers."""
        ...


class _OpenAIWithBackoff(openai.OpenAI):
    """The SDK client, its retry delays set by the judge's backoff settings instead of its constants."""

    def __init__(self, *, backoff_s: float, backoff_max_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s

    def _calculate_retry_timeout(
        self, remaining_retries: int, options: object, response_headers: object = None
    ) -> float:
        retries_taken = self.max_retries - remaining_retries
        return min(self.backoff_s * 2.0**retries_taken, self.backoff_max_s) * (0.5 + random.random() / 2)


class OpenAIJudgeClient:
    """`calls` counts HTTP attempts, retries included (what the endpoint was asked to do)."""

    def __init__(self, cfg: JudgeConfig):
        if not cfg.model:
            raise ConfigError("OFFDPO_JUDGE_MODEL is not set: name the judge model the endpoint serves")
        self.cfg = cfg
        self.model = cfg.model
        self.calls = 0
        self._lock = threading.Lock()
        self._attempts = threading.local()  # attempts of the request this thread is making
        self.client = _OpenAIWithBackoff(
            base_url=cfg.base_url,
            api_key=cfg.api_key or "unused",
            timeout=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s,
            backoff_max_s=cfg.backoff_max_s,
            http_client=openai.DefaultHttpxClient(event_hooks={"request": [self._on_attempt]}),
        )

    def _on_attempt(self, request: object) -> None:
        # Runs in the calling thread before every HTTP attempt, so the count is per complete() call.
        with self._lock:
            self.calls += 1
        self._attempts.n = getattr(self._attempts, "n", 0) + 1
        if self._attempts.n > 1:
            log.warning("judge %s: retry %d of %d", self.model, self._attempts.n - 1, self.cfg.max_retries)

    def complete(self, prompt: str, choices: Sequence[str]) -> str:
        self._attempts.n = 0
        try:
            resp = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=self.cfg.max_tokens,
                temperature=self.cfg.temperature,
                extra_body={"structured_outputs": {"choice": list(choices)}} if self.cfg.structured_output else None,
            )
        except openai.APIStatusError as exc:
            if exc.status_code in _REFUSED_FOR_THIS_REQUEST:
                raise JudgeRefused(
                    f"judge {self.model} at {self.cfg.base_url} refused the request for this set "
                    f"(HTTP {exc.status_code}: {exc.message}); e.g. the prompt and answers are over the judge's "
                    "context length: shorten them or use a judge with a longer context"
                ) from None
            raise JudgeError(
                f"judge {self.model} at {self.cfg.base_url} failed after {max(1, self._attempts.n)} "
                f"attempt(s): {type(exc).__name__}: {exc}"
            ) from None
        except openai.OpenAIError as exc:
            raise JudgeError(
                f"judge {self.model} at {self.cfg.base_url} failed after {max(1, self._attempts.n)} "
                f"attempt(s): {type(exc).__name__}: {exc}"
            ) from None
        return resp.choices[0].message.content or ""
