"""A drop-in for TRL's DPOTrainer that trains on exported reference log-probs: no reference forward,
no reference model in memory.

    from integrations.trl_dpo import OfflineRefDPOTrainer
    from integrations.trl_export import load_trl_dataset
    trainer = OfflineRefDPOTrainer(model=policy, args=DPOConfig(output_dir="out", max_length=None),
                                   train_dataset=load_trl_dataset("data/trl-pairs"), processing_class=tokenizer)
    trainer.train()

Why a subclass: TRL 1.16.0's DPOTrainer, with `precompute_ref_log_probs=True`, always runs its own
reference forward over the whole dataset (`_precompute_ref_logps`, trl/trainer/dpo_trainer.py:1168) and
re-tokenises text columns (`_prepare_dataset`, :1036); with it off, it loads a second copy of the
model as reference (:908-927). But its loss reads `inputs["ref_chosen_logps"]` /
`inputs["ref_rejected_logps"]` straight from the batch when `precompute_ref_logps` is set (:1318-1319),
and its collator passes those columns through (:177-204). So this subclass only:
  1. checks the data's reference fingerprint against the policy's initial weights, tokenizer and chat
     template, before anything is loaded or trained, and refuses a mismatch naming the field;
  2. sets `precompute_ref_log_probs=True` (so TRL keeps `ref_model=None` and reads the columns);
  3. takes the tokenized columns as they are (`_prepare_dataset`: no re-tokenising, no BOS/EOS added),
     refusing missing columns and rows TRL's collator would truncate (`max_length`), since a truncated
     answer would no longer match its stored log-prob sum;
  4. uses the stored sums instead of computing them (`_precompute_ref_logps`), and refuses any
     reference forward (`compute_ref_log_probs` raises).
It overrides private hooks of TRL, so it is pinned: tested with trl==1.16.0 (the `trl` extra).

Precision: TRL's configs default to bf16=True (trl/trainer/base_config.py:108), so the policy runs under
bf16 autocast while the stored reference log-probs are in refscore's dtype (fingerprint.dtype). For
float32 parity with services/trainer (tests/test_trl.py: step-0 loss and rewards within 1e-5), pass
DPOConfig(bf16=False). TRL still hashes the policy's weights once at construction (`hash_module`, :980),
which it uses only to name its precompute cache.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pyarrow.compute as pc

from integrations.trl_export import TRL_COLUMNS, dataset_fingerprint, fingerprint_from_dict
from offdpo.fingerprint import chat_template_hash, tokenizer_hash, weights_hash
from offdpo.records import ReferenceFingerprint

try:
    import trl
    from trl import DPOConfig, DPOTrainer
except ImportError as exc:  # pragma: no cover - the core install has no TRL
    raise ImportError("integrations.trl_dpo needs TRL: pip install -e '.[trl]'") from exc

log = logging.getLogger(__name__)

TESTED_TRL_VERSION = "1.16.0"
# Private hooks this subclass overrides or relies on (their absence means an untested TRL).
_TRL_HOOKS = ("_prepare_dataset", "_precompute_ref_logps", "compute_ref_log_probs", "_compute_loss")
# The fingerprint fields that decide whether stored log-probs are the policy's initial log-probs.
_CHECKED_FIELDS = (
    ("weights_hash", "weights hash"),
    ("tokenizer_hash", "tokenizer hash"),
    ("chat_template_hash", "chat template hash"),
)


class FingerprintMismatchError(ValueError):
    """The exported reference log-probs were not computed by the policy's initial model."""


class ExportedDataError(ValueError):
    """The dataset is not an offdpo export TRL can train on as is; the message says what to fix."""


# -- the fingerprint check -------------------------------------------------------------------------
def _model_dir(model, explicit) -> Path:
    candidate = explicit or (
        model
        if isinstance(model, (str, Path))
        else getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    )
    if not candidate or not Path(candidate).is_dir():
        raise FingerprintMismatchError(
            f"cannot check the reference fingerprint: the policy's initial weights are not a local directory "
            f"({candidate!r}). Pass reference_model_dir= the directory the policy was loaded from (the one refscore "
            f"scored with)."
        )
    return Path(candidate)


def check_reference_fingerprint(
    reference: ReferenceFingerprint, model_dir: str | Path, tokenizer=None, allowed_ids: tuple[str, ...] = ()
) -> None:
    """Raise FingerprintMismatchError unless `model_dir` (+ `tokenizer`) is what scored `reference`.

    Weights: the *.safetensors files in `model_dir` (the policy's initial weights). Tokenizer: its files
    (the tokenizer's own directory if it has one, else `model_dir`). Chat template: the tokenizer's
    in-memory template, as refscore hashes it (services/refscore/scorer.py).
    """
    if reference.fingerprint_id and reference.fingerprint_id in allowed_ids:
        log.warning("reference fingerprint %s accepted deliberately (allow_fingerprint_id)", reference.fingerprint_id)
        return
    model_dir = Path(model_dir)
    tok_dir = Path(getattr(tokenizer, "name_or_path", "") or model_dir)
    tok_dir = tok_dir if tok_dir.is_dir() else model_dir
    if tokenizer is None:  # TRL will load the tokenizer from the model directory: hash the template it will use
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = getattr(tokenizer, "chat_template", None)
    policy = {
        "weights_hash": weights_hash(model_dir),
        "tokenizer_hash": tokenizer_hash(tok_dir),
        "chat_template_hash": chat_template_hash(template),
    }
    diffs = [
        f"{label}: data {getattr(reference, name)[:16] or '(none)'}, policy {policy[name][:16] or '(none)'}"
        for name, label in _CHECKED_FIELDS
        if getattr(reference, name) != policy[name]
    ]
    if diffs:
        raise FingerprintMismatchError(
            f"reference fingerprint mismatch: the exported log-probs were scored by {reference.model_id!r} "
            f"(fingerprint {reference.fingerprint_id}, {reference.engine} {reference.dtype}), but the policy "
            f"({model_dir}) differs in {'; '.join(diffs)}. DPO needs the reference to be the policy's initial model: "
            f"start from the model refscore scored with (same weights, tokenizer and chat template), or rescore the "
            f"pairs with this policy (refscore with OFFDPO_REFSCORE_MODEL_DIR={model_dir}) and export again. To accept "
            f"this data deliberately, pass allow_fingerprint_id={reference.fingerprint_id!r}."
        )
    if reference.dtype:
        log.info(
            "reference log-probs were computed in %s by %s %s",
            reference.dtype,
            reference.engine,
            reference.engine_version,
        )


# -- the columns -----------------------------------------------------------------------------------
def check_exported_columns(dataset, max_length: int | None, what: str) -> None:
    """Refuse datasets TRL would re-tokenise or truncate, naming what is missing or too long."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise ExportedDataError(
            f"{what} is a {type(dataset).__name__}; OfflineRefDPOTrainer takes a map-style "
            f"datasets.Dataset (integrations.trl_export.load_trl_dataset)"
        )
    missing = [c for c in TRL_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ExportedDataError(
            f"{what} lacks column(s) {', '.join(missing)} (has {', '.join(dataset.column_names)}); "
            f"OfflineRefDPOTrainer trains on tokenized pairs with stored reference log-prob sums: "
            f"export them with `offdpo export-trl` (integrations.trl_export.export_trl)"
        )
    table = dataset.data.table
    for col in ("ref_chosen_logps", "ref_rejected_logps"):
        values = table.column(col)
        if values.null_count or pc.any(pc.is_nan(values.cast("float64"))).as_py():
            raise ExportedDataError(f"{what}: column {col} has null or NaN values; re-export the shards")
    if max_length is None:
        return
    lengths = pc.add(
        pc.list_value_length(table.column("prompt_ids")),
        pc.max_element_wise(
            pc.list_value_length(table.column("chosen_ids")), pc.list_value_length(table.column("rejected_ids"))
        ),
    )
    longest = pc.max(lengths).as_py() or 0
    if longest > max_length:
        raise ExportedDataError(
            f"{what} has pairs of up to {longest} tokens (prompt + longer answer), over DPOConfig.max_length="
            f"{max_length}; TRL would truncate them and the stored reference log-prob sums would no longer match. "
            f"Set DPOConfig(max_length=None) or at least {longest}, or drop the long pairs before training."
        )


# -- the trainer -----------------------------------------------------------------------------------
class OfflineRefDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer on exported reference log-probs (see the module docstring)."""

    def __init__(
        self,
        model,
        args: DPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        *,
        ref_model=None,
        reference_fingerprint=None,
        reference_model_dir: str | Path | None = None,
        allow_fingerprint_id: str | tuple[str, ...] = (),
        **kwargs,
    ):
        if trl.__version__ != TESTED_TRL_VERSION:
            warnings.warn(
                f"OfflineRefDPOTrainer was tested with trl=={TESTED_TRL_VERSION}, this is trl "
                f"{trl.__version__}: it overrides TRL's private hooks {_TRL_HOOKS}",
                stacklevel=2,
            )
        for hook in _TRL_HOOKS:
            if not hasattr(DPOTrainer, hook):
                raise RuntimeError(f"trl {trl.__version__} has no DPOTrainer.{hook}: install trl=={TESTED_TRL_VERSION}")
        if ref_model is not None:
            raise ValueError("OfflineRefDPOTrainer takes no ref_model: the reference log-probs come from the data")
        if args is None:
            name = model if isinstance(model, (str, Path)) else getattr(model, "name_or_path", "") or "model"
            args = DPOConfig(output_dir=f"{Path(str(name)).name}-DPO")
        if args.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True updates the reference during training; stored reference log-probs cannot follow it"
            )
        if args.ld_alpha is not None:
            raise ValueError(
                "ld_alpha (LD-DPO) weights answer tokens unequally; the exported ref_*_logps are plain "
                "sums over all answer tokens, so they cannot be reused with it"
            )
        # Up front, before any model is loaded or any step runs.
        check_exported_columns(train_dataset, args.max_length, "train_dataset")
        evals = (
            eval_dataset.items()
            if isinstance(eval_dataset, dict)
            else ([("eval_dataset", eval_dataset)] if eval_dataset is not None else [])
        )
        for name, ds in evals:
            check_exported_columns(ds, args.max_length, str(name))
        if reference_fingerprint is None:
            reference_fingerprint = dataset_fingerprint(train_dataset)
            if reference_fingerprint is None:
                raise ExportedDataError(
                    "train_dataset carries no reference fingerprint (DatasetInfo.description): open the export with "
                    "integrations.trl_export.load_trl_dataset, or pass reference_fingerprint= the ReferenceFingerprint "
                    "that scored it"
                )
        elif isinstance(reference_fingerprint, dict):
            reference_fingerprint = fingerprint_from_dict(reference_fingerprint)
        for name, ds in evals:
            other = dataset_fingerprint(ds)
            if other is not None and other.fingerprint_id != reference_fingerprint.fingerprint_id:
                raise FingerprintMismatchError(
                    f"{name} was scored by reference {other.fingerprint_id}, train_dataset "
                    f"by {reference_fingerprint.fingerprint_id}: export both from one reference"
                )
        allowed = (allow_fingerprint_id,) if isinstance(allow_fingerprint_id, str) else tuple(allow_fingerprint_id)
        check_reference_fingerprint(
            reference_fingerprint, _model_dir(model, reference_model_dir), processing_class, allowed
        )
        self.reference_fingerprint = reference_fingerprint
        if not args.precompute_ref_log_probs:
            log.info("setting precompute_ref_log_probs=True: the reference log-probs are read from the dataset")
            args.precompute_ref_log_probs = True
        super().__init__(
            model=model,
            ref_model=None,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )

    # TRL hooks ------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        """Take the tokenized columns as they are: no re-tokenising, no added BOS/EOS."""
        check_exported_columns(dataset, args.max_length, f"{dataset_name} dataset")
        return dataset

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """The stored sums are the precomputed reference log-probs."""
        check_exported_columns(dataset, self.args.max_length, f"{name} dataset")
        return dataset

    def compute_ref_log_probs(self, model, inputs):
        raise RuntimeError(
            "OfflineRefDPOTrainer never runs a reference forward: the reference log-probs come from "
            "the dataset's ref_chosen_logps / ref_rejected_logps columns"
        )
