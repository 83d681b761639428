"""The tokenisation boundary: which token ids are "the answer" that the trainer trains on.

Rule (tokenise once; the trainer never re-tokenises):
1. Chat prompt: render the chat template with the generation prompt and tokenise the text with
   `add_special_tokens=False` (the template already writes BOS where the model wants one, so
   adding special tokens would give a second BOS).
2. Plain-text prompt: tokenise with the tokenizer's default special tokens (BOS if the model uses
   one), never twice. Token-id prompts are used verbatim.
3. The answer text is tokenised on its own (`add_special_tokens=False`) and concatenated to the
   prompt ids. Tokenising prompt+answer jointly can merge tokens across the boundary; separate
   tokenisation keeps the boundary exact and is what generation produces token by token.
4. After a chat answer, the template closes the assistant turn (ChatML: "<|im_end|>\n"). The
   answer includes the closing tokens up to and including the first stop token (EOS / end of
   turn), because the policy must learn to stop; what follows the stop token ("\n") is never
   generated and is not scored. Plain-text and token-id answers are scored as given.
5. At start-up the template is checked to be prefix-stable: rendering the conversation with the
   assistant answer must start with the rendering of the prompt with the generation prompt;
   otherwise the server refuses to start (the boundary would be ill-defined).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from dataclasses import dataclass

from offdpo.v1 import records_pb2
from services.refscore.errors import TokenizationError

__all__ = ["BoundaryTokenizer", "EncodedPrompt", "TokenizationError", "request_local_cache"]

# Inside `request_local_cache()`: rendered prompts are cached in this dict only (one request's
# lifetime), never in or from the tokenizer's shared cache.
_LOCAL_CACHE: contextvars.ContextVar[dict[str, tuple[int, ...]] | None] = contextvars.ContextVar(
    "tokenization_local_cache", default=None
)


@contextlib.contextmanager
def request_local_cache() -> Iterator[None]:
    """Tokenise a gRPC caller's request with a cache of its own: nothing it sends is cached for
    later (a caller refused after tokenising leaves no trace, and no caller can time another's
    prompts through the shared cache). The stream worker's pairs keep the shared cache."""
    token = _LOCAL_CACHE.set({})
    try:
        yield
    finally:
        _LOCAL_CACHE.reset(token)


_PROBE = "\u2063offdpo-probe-answer\u2063"


@dataclass
class EncodedPrompt:
    ids: list[int]
    is_chat: bool


class BoundaryTokenizer:
    def __init__(self, tokenizer, stop_token_ids: list[int] | None = None):
        self.tok = tokenizer
        self.vocab_size = len(tokenizer)
        self.bos_id = tokenizer.bos_token_id
        stops = set(stop_token_ids or [])
        if tokenizer.eos_token_id is not None:
            stops.add(tokenizer.eos_token_id)
        self.stop_token_ids = sorted(stops)
        self.chat_template = getattr(tokenizer, "chat_template", None)
        # Plain encodes (no special tokens added) go straight to the Rust tokenizer: the same ids as
        # tokenizer(text, add_special_tokens=False) without transformers' per-call Python overhead
        # (~15% of tokenising on the bench items). Not when transformers splits special tokens itself.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None if backend is None or getattr(tokenizer, "split_special_tokens", False) else backend
        # A preference pair's two answers share one prompt: tokenise a rendered prompt once.
        self._prompt_ids = functools.lru_cache(maxsize=4096)(self._plain_ids)
        self.end_of_turn_ids = self._end_of_turn_ids() if self.chat_template else []

    def _cached_prompt_ids(self, text: str) -> tuple[int, ...]:
        local = _LOCAL_CACHE.get()
        if local is None:
            return self._prompt_ids(text)
        if text not in local:
            local[text] = self._plain_ids(text)
        return local[text]

    def _plain_ids(self, text: str) -> tuple[int, ...]:
        if self._backend is not None:
            return tuple(self._backend.encode(text, add_special_tokens=False).ids)
        return tuple(self.tok(text, add_special_tokens=False).input_ids)

    # -- template inspection ----------------------------------------------------------------
    def _render(self, messages, add_generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _end_of_turn_ids(self) -> list[int]:
        messages = [{"role": "user", "content": "hi"}]
        prompt = self._render(messages, True)
        full = self._render(messages + [{"role": "assistant", "content": _PROBE}], False)
        if not full.startswith(prompt):
            raise TokenizationError(
                "the chat template is not prefix-stable: rendering the conversation with the "
                "answer does not start with the prompt rendered with add_generation_prompt=True"
            )
        after = full[len(prompt) :]
        if not after.startswith(_PROBE):
            raise TokenizationError("the chat template changes the assistant answer text; cannot find its boundary")
        suffix_ids = list(self._plain_ids(after[len(_PROBE) :]))
        for i, tid in enumerate(suffix_ids):
            if tid in self.stop_token_ids:
                return suffix_ids[: i + 1]
        return []  # the template ends the turn without a stop token: nothing to learn there

    # -- encoding ---------------------------------------------------------------------------
    def _check_ids(self, ids, what: str) -> list[int]:
        ids = list(ids)
        bad = [t for t in ids if t < 0 or t >= self.vocab_size]
        if bad:
            raise TokenizationError(f"{what} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def encode_prompt(self, prompt: records_pb2.Prompt) -> EncodedPrompt:
        kind = prompt.WhichOneof("kind")
        if kind == "chat":
            messages = [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
            if not messages:
                raise TokenizationError("prompt.chat has no messages")
            for j, m in enumerate(messages):
                if not m["role"]:
                    raise TokenizationError(f"prompt.chat.messages[{j}] has no role")
            if not self.chat_template:
                raise TokenizationError("the model has no chat template: send prompt.text or prompt.token_ids")
            text = self._render(messages, True)
            return EncodedPrompt(list(self._cached_prompt_ids(text)), True)
        if kind == "text":
            if not prompt.text:
                raise TokenizationError("prompt.text is empty")
            ids = self.tok(prompt.text, add_special_tokens=True).input_ids
            if self.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:
                ids = ids[1:]  # the text already began with BOS
            return EncodedPrompt(ids, False)
        if kind == "token_ids":
            if not prompt.token_ids.ids:
                raise TokenizationError("prompt.token_ids is empty")
            return EncodedPrompt(self._check_ids(prompt.token_ids.ids, "prompt.token_ids"), False)
        raise TokenizationError("prompt is missing: set prompt.chat, prompt.text or prompt.token_ids")

    def encode_answer_text(self, answer: str, after_chat_prompt: bool) -> list[int]:
        if not answer:
            raise TokenizationError("the answer is empty")
        ids = list(self._plain_ids(answer))
        return ids + self.end_of_turn_ids if after_chat_prompt else ids

    def encode_answer_ids(self, ids) -> list[int]:
        if not ids:
            raise TokenizationError("answer_token_ids is empty")
        return self._check_ids(ids, "answer_token_ids")

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)
