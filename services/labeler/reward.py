"""Reward-model strategy: a Hugging Face sequence-classification model scores every answer (in
batches); the best answer against the worst (or all pairs above a margin) become pairs."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from offdpo.records import RecordError
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.base import Outcome, base_provenance, pairs_from_scores


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


class RewardModel:
    def __init__(self, model_dir: str | Path, batch_size: int = 16, max_length: int = 2048, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        self.model_dir = str(model_dir)
        self.identity = model_identity(model_dir)
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
        kind = prompt.WhichOneof("kind")
        if kind == "chat" and self.tokenizer.chat_template:
            msgs = [{"role": m.role, "content": m.content} for m in prompt.chat.messages]
            msgs.append({"role": "assistant", "content": answer})
            return self.tokenizer.apply_chat_template(msgs, tokenize=False)
        if kind == "chat":
            return "\n".join(f"{m.role}: {m.content}" for m in prompt.chat.messages) + f"\nassistant: {answer}"
        if kind == "text":
            return prompt.text + answer
        raise RecordError("the reward model needs a text or chat prompt, not token ids")

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
    name = "reward_model"

    def __init__(self, model: RewardModel, pair_mode: str = "best_worst", margin: float = 0.0):
        self.model = model
        self.pair_mode = pair_mode
        self.margin = margin

    def label_batch(self, sets: Sequence[labeler_pb2.CandidateSet], source: str) -> list[Outcome | Exception]:
        texts: list[str] = []
        spans: list[tuple[int, int] | Exception] = []
        for cs in sets:
            try:
                rendered = [self.model.render(cs.prompt, a) for a in cs.answers]
            except RecordError as exc:
                spans.append(exc)
                continue
            spans.append((len(texts), len(texts) + len(rendered)))
            texts.extend(rendered)
        scores = self.model.score_texts(texts)  # every answer of the batch, batch_size at a time
        results: list[Outcome | Exception] = []
        for cs, span in zip(sets, spans):
            if isinstance(span, Exception):
                results.append(span)
                continue
            s = scores[span[0] : span[1]]

            def prov(c: int, r: int, cs=cs, s=s) -> records_pb2.Provenance:
                p = base_provenance(records_pb2.LABEL_STRATEGY_REWARD_MODEL, cs, source)
                p.chosen_score, p.rejected_score = s[c], s[r]
                p.reward_model = self.model.identity
                p.metadata["reward_scores"] = json.dumps([round(x, 6) for x in s])
                return p

            results.append(pairs_from_scores(cs, s, self.pair_mode, self.margin, prov))
        return results
