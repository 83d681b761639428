"""Reward-model strategy: a Hugging Face sequence-classification model scores every answer (in
batches); the best answer against the worst (or all pairs above a margin) become pairs."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from pathlib import Path

from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.base import Result, base_provenance, pairs_from_scores
from services.labeler.errors import LabelError
from services.labeler.inputs import readable_kind
from services.labeler.names import PairMode, StrategyName


def model_identity(model_dir: str | Path) -> str:
    """'<dir name>@<sha256 prefix of config + weights index>' so provenance names the exact model."""
    path = Path(model_dir)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "model.safetensors"):
        f = path / name
        if f.exists():
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return f"{path.name}@{h.hexdigest()[:12]}"


# transformers' from_pretrained is not thread-safe: for the length of a load it swaps process-wide
# attributes (PreTrainedModel.tie_weights, torch's init functions, torch.linspace) and puts back what it
# saw on entry. Two loads overlapping in threads of one process (labelers built in threads, as the
# learning experiment does) can put back each other's stand-ins, leaving weight tying off for the rest
# of the process: every tied causal LM loaded later then has an uninitialised lm_head (sampling from it
# raised "probability tensor contains inf/nan"). So every load here holds this lock.
_LOAD_LOCK = threading.Lock()


class RewardModel:
    def __init__(self, model_dir: str | Path, batch_size: int = 16, max_length: int = 2048, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.model_dir = str(model_dir)
        self.identity = model_identity(model_dir)
        with _LOAD_LOCK:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self.model = AutoModelForSequenceClassification.from_pretrained(self.model_dir, dtype=torch.float32)
        self.model.to(device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(
                f"reward model {model_dir} has {self.model.config.num_labels} labels; expected 1 (a scalar reward)"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device

    def render(self, prompt: records_pb2.Prompt, answer: str) -> str:
        """The text the model scores; LabelError for a prompt of token ids."""
        if readable_kind(prompt, "the reward model") == "text":
            return prompt.text + answer
        if not self.tokenizer.chat_template:
            return "\n".join(f"{m.role}: {m.content}" for m in prompt.chat.messages) + f"\nassistant: {answer}"
        msgs = [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
        msgs.append({"role": "assistant", "content": answer})
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False)
        assert isinstance(text, str), "apply_chat_template(tokenize=False) returns the rendered text"
        return text

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            # The template already holds BOS/special tokens; do not add them twice.
            enc = self.tokenizer(
                chunk,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            )
            with self.torch.inference_mode():
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            out.extend(float(x) for x in logits[:, 0].float().cpu())
        return out


class RewardModelStrategy:
    name = StrategyName.REWARD_MODEL.value

    def __init__(self, model: RewardModel, pair_mode: str = PairMode.BEST_WORST, margin: float = 0.0):
        self.model = model
        self.pair_mode = pair_mode
        self.margin = margin

    def label_batch(self, sets: Sequence[labeler_pb2.CandidateSet], source: str) -> list[Result]:
        texts: list[str] = []
        spans: list[range | LabelError] = []  # each set's answers' positions in `texts`, or why it has none
        for cs in sets:
            try:
                rendered = [self.model.render(cs.prompt, a) for a in cs.answers]
            except LabelError as exc:
                spans.append(exc)
                continue
            spans.append(range(len(texts), len(texts) + len(rendered)))
            texts.extend(rendered)
        scores = self.model.score_texts(texts)  # every answer of the batch, batch_size at a time
        results: list[Result] = []
        for cs, span in zip(sets, spans):
            if isinstance(span, LabelError):
                results.append(span)
                continue
            s = scores[span.start : span.stop]

            def prov(c: int, r: int, cs=cs, s=s) -> records_pb2.Provenance:
                p = base_provenance(StrategyName.REWARD_MODEL, cs, source)
                p.chosen_score, p.rejected_score = s[c], s[r]
                p.reward_model = self.model.identity
                p.metadata["reward_scores"] = json.dumps([round(x, 6) for x in s])
                return p

            results.append(pairs_from_scores(cs, s, self.pair_mode, self.margin, prov))
        return results
