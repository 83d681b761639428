"""Export scored shards to a Hugging Face `datasets` dataset in TRL's tokenized DPO layout.

TRL's DPOTrainer reads the columns `prompt_ids`, `chosen_ids`, `rejected_ids` and, with
`precompute_ref_log_probs`, `ref_chosen_logps` / `ref_rejected_logps`: the reference log-prob of each
answer summed over its tokens (trl 1.16.0, trainer/dpo_trainer.py, `compute_ref_log_probs` and
`_compute_loss`). Our shards hold exactly that, computed once by refscore, so the export only renames
columns and sums the stored per-token log-probs (in float64, in token order, as services/trainer
does, so both trainers see the same float32 reference values).

The export streams: shards are listed, then fetched, converted and written one at a time, so memory
holds one shard (plus the set of pair ids seen, for de-duplication) however large the prefix is.

The reference fingerprint travels with the data: in `DatasetInfo.description` (JSON, kept by
`save_to_disk` / `load_from_disk`) and, for Parquet, also in the file's schema metadata under
`offdpo.fingerprint`. `load_trl_dataset` reads either back with the fingerprint attached, which
`integrations.trl_dpo.OfflineRefDPOTrainer` checks against the policy before training.

    offdpo export-trl s3://offdpo/scores/<fingerprint_id>/ data/trl-pairs            # save_to_disk layout
    offdpo export-trl ./shards/ data/trl-pairs --format parquet                       # one Parquet file
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf import json_format

from offdpo.records import MAX_SHARD_BYTES, RecordError, read_shard
from offdpo.v1 import records_pb2

log = logging.getLogger(__name__)

# TRL's column names (trl 1.16.0: DataCollatorForPreference.torch_call and
# DPOTrainer._set_signature_columns_if_needed), plus our pair id.
TRL_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
TRL_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("chosen_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("rejected_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("ref_chosen_logps", pa.float64(), nullable=False),
        pa.field("ref_rejected_logps", pa.float64(), nullable=False),
    ]
)
METADATA_KEY = "offdpo.reference_fingerprint"  # key in the JSON of DatasetInfo.description
PARQUET_FINGERPRINT_KEY = b"offdpo.fingerprint"
PARQUET_FILE_NAME = "train-00000-of-00001.parquet"
FORMATS = ("disk", "parquet")
# A stored sum that disagrees with the per-token values by more than this is a corrupt shard.
_SUM_TOLERANCE = 1e-3


class ExportError(ValueError):
    """The export cannot go on; the message names the shard or setting and what to fix."""


@dataclass
class ExportResult:
    path: Path
    format: str
    shards: int
    pairs: int
    duplicates: int
    fingerprint: records_pb2.ReferenceFingerprint


# -- where shards come from ------------------------------------------------------------------------
class ShardSource:
    """A list of shard names and a way to fetch one shard's bytes (S3 prefix or local folder)."""

    def __init__(self, keys: list[str], fetch: Callable[[str], bytes], description: str):
        self.keys, self.fetch, self.description = keys, fetch, description

    @classmethod
    def from_store(cls, store, prefix: str) -> ShardSource:
        keys = [k for k in store.list_keys(prefix) if k.endswith(".parquet")]
        return cls(keys, lambda key: store.get_bytes(key, max_bytes=MAX_SHARD_BYTES), f"s3://{store.bucket}/{prefix}")

    @classmethod
    def from_dir(cls, root: str | Path) -> ShardSource:
        root = Path(root)
        keys = sorted(str(p) for p in root.rglob("*.parquet"))
        return cls(keys, lambda key: Path(key).read_bytes(), str(root))

    @classmethod
    def parse(cls, source: str, s3_config=None) -> ShardSource:
        """`s3://BUCKET/PREFIX` (credentials from OFFDPO_S3_*) or an existing local folder."""
        if source.startswith("s3://"):
            from offdpo.config import S3Config
            from offdpo.s3 import ObjectStore

            bucket, _, prefix = source[len("s3://") :].partition("/")
            if not bucket:
                raise ExportError(f"source {source!r} names no bucket: write s3://BUCKET/scores/<fingerprint_id>/")
            return cls.from_store(ObjectStore(s3_config or S3Config.from_env(), bucket=bucket), prefix)
        if Path(source).is_dir():
            return cls.from_dir(source)
        raise ExportError(
            f"source {source!r} is neither s3://BUCKET/PREFIX nor an existing local folder of *.parquet shards"
        )


# -- shard -> TRL rows -----------------------------------------------------------------------------
def _answer_sums(per_token: list[list[float]], stored: list[float], what: str, pair_ids: list[str]) -> list[float]:
    sums = []
    for pid, values, stored_sum in zip(pair_ids, per_token, stored):
        total = float(sum(float(x) for x in values))  # float64, token order: as services/trainer/losses.make_batch
        if abs(total - stored_sum) > _SUM_TOLERANCE * max(1.0, abs(stored_sum)):
            raise ExportError(
                f"{what}: pair {pid}: stored log-prob sum {stored_sum} disagrees with its per-token "
                f"log-probs (sum {total}); the shard is corrupt, rescore it"
            )
        sums.append(total)
    return sums


def shard_to_trl_table(data: bytes, key: str) -> tuple[pa.Table, records_pb2.ReferenceFingerprint]:
    """One scored shard as a table in TRL's columns, with the fingerprint it was scored with."""
    try:
        shard = read_shard(data, what=f"shard {key}")
    except RecordError as exc:
        raise ExportError(str(exc)) from None
    t = shard.table
    pair_ids = t.column("pair_id").to_pylist()
    ref_chosen = _answer_sums(
        t.column("chosen_logprobs").to_pylist(), t.column("chosen_logprob_sum").to_pylist(), f"shard {key}", pair_ids
    )
    ref_rejected = _answer_sums(
        t.column("rejected_logprobs").to_pylist(),
        t.column("rejected_logprob_sum").to_pylist(),
        f"shard {key}",
        pair_ids,
    )
    table = pa.table(
        {
            "pair_id": t.column("pair_id"),
            "prompt_ids": t.column("prompt_token_ids"),
            "chosen_ids": t.column("chosen_token_ids"),
            "rejected_ids": t.column("rejected_token_ids"),
            "ref_chosen_logps": pa.array(ref_chosen, pa.float64()),
            "ref_rejected_logps": pa.array(ref_rejected, pa.float64()),
        },
        schema=TRL_SCHEMA,
    )
    return table, shard.fingerprint


def iter_trl_tables(
    source: ShardSource, stats: dict | None = None
) -> Iterator[tuple[str, pa.Table, records_pb2.ReferenceFingerprint]]:
    """Yield (key, table, fingerprint) shard by shard, lazily: a shard is fetched only when asked for.

    Pairs already yielded (same pair_id, e.g. a shard rewritten after a crash) are dropped, as the
    trainer does. All shards must carry one fingerprint: mixing references would make the log-ratios
    meaningless.
    """
    stats = stats if stats is not None else {}
    stats.setdefault("duplicates", 0)
    seen: set[str] = set()
    first_fp = None
    for key in source.keys:
        table, fp = shard_to_trl_table(source.fetch(key), key)
        if first_fp is None:
            first_fp = fp
        elif fp.fingerprint_id != first_fp.fingerprint_id:
            raise ExportError(
                f"shard {key} was scored by reference {fp.fingerprint_id}, earlier shards by "
                f"{first_fp.fingerprint_id}: export one reference at a time "
                f"(prefix scores/<fingerprint_id>/)"
            )
        ids = table.column("pair_id").to_pylist()
        keep = [i for i, pid in enumerate(ids) if pid not in seen and not seen.add(pid)]  # also dedups within a shard
        stats["duplicates"] += len(ids) - len(keep)
        if len(keep) != len(ids):
            table = table.take(pa.array(keep, pa.int64()))
        yield key, table, fp


# -- metadata --------------------------------------------------------------------------------------
def fingerprint_to_dict(fp: records_pb2.ReferenceFingerprint) -> dict:
    return json_format.MessageToDict(fp, preserving_proto_field_name=True)


def fingerprint_from_dict(d: dict) -> records_pb2.ReferenceFingerprint:
    return json_format.ParseDict(d, records_pb2.ReferenceFingerprint())


def _description(fp: records_pb2.ReferenceFingerprint, source: str, pairs: int) -> str:
    return json.dumps(
        {
            METADATA_KEY: fingerprint_to_dict(fp),
            "offdpo.source": source,
            "offdpo.pairs": pairs,
            "offdpo.columns": "TRL DPOTrainer tokenized layout; ref_*_logps are sums over answer tokens",
        },
        sort_keys=True,
    )


def dataset_fingerprint(dataset) -> records_pb2.ReferenceFingerprint | None:
    """The reference fingerprint an exported dataset carries (None if it carries none)."""
    description = getattr(getattr(dataset, "info", None), "description", "") or ""
    try:
        meta = json.loads(description)
    except ValueError:
        return None
    if not isinstance(meta, dict) or METADATA_KEY not in meta:
        return None
    return fingerprint_from_dict(meta[METADATA_KEY])


def _hf_features_metadata() -> bytes:
    from datasets import Features

    return json.dumps({"info": {"features": Features.from_arrow_schema(TRL_SCHEMA).to_dict()}}).encode()


# -- the export ------------------------------------------------------------------------------------
def export_trl(
    source: str | ShardSource, out: str | Path, *, format: str = "disk", overwrite: bool = False, s3_config=None
) -> ExportResult:
    """Write the shards under `source` as a TRL-ready dataset at `out`.

    format 'disk': `datasets` save_to_disk layout (open with `load_trl_dataset` or `datasets.load_from_disk`).
    format 'parquet': `out/train-00000-of-00001.parquet`, fingerprint in its schema metadata.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    src = source if isinstance(source, ShardSource) else ShardSource.parse(source, s3_config)
    if not src.keys:
        raise ExportError(f"no *.parquet shards under {src.description}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: an export is a folder; choose another path")
    occupied = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if occupied:
        if not overwrite:
            raise ExportError(f"{out} already exists and is not empty: choose another path or pass overwrite")
        foreign = [name for name in occupied if not _export_artefact(name)]
        if foreign:
            # overwrite replaces an earlier export, never a folder that holds something else (a model,
            # a checkpoint): a mistyped path must not delete it.
            raise ExportError(
                f"{out} holds files an export does not write ({', '.join(foreign[:5])}"
                f"{', ...' if len(foreign) > 5 else ''}): overwrite replaces only an earlier export; "
                "choose another path"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (".offdpo-export.parquet" if format == "disk" else PARQUET_FILE_NAME + ".partial")
    stats: dict = {}
    writer, fingerprint, pairs, shards = None, None, 0, 0
    try:
        for key, table, fp in iter_trl_tables(src, stats):
            if writer is None:
                fingerprint = fp
                meta = {
                    PARQUET_FINGERPRINT_KEY: json_format.MessageToJson(fp, indent=None).encode(),
                    b"huggingface": _hf_features_metadata(),
                }
                writer = pq.ParquetWriter(tmp, TRL_SCHEMA.with_metadata(meta), compression="zstd")
            writer.write_table(table)
            pairs += table.num_rows
            shards += 1
            log.info("exported shard %s: %d pairs (%d so far)", key, table.num_rows, pairs)
    except BaseException:
        if writer is not None:
            writer.close()
            writer = None
        tmp.unlink(missing_ok=True)  # no half-written export left behind
        raise
    finally:
        if writer is not None:
            writer.close()
    if format == "parquet":
        tmp.rename(out / PARQUET_FILE_NAME)
    else:
        _parquet_to_disk(tmp, out, _description(fingerprint, src.description, pairs))
    log.info("exported %d pairs from %d shards (%d duplicates dropped) to %s", pairs, shards, stats["duplicates"], out)
    return ExportResult(out, format, shards, pairs, stats["duplicates"], fingerprint)


def _export_artefact(name: str) -> bool:
    """A file an export writes (either format, finished or interrupted)."""
    return (
        name in (PARQUET_FILE_NAME, "dataset_info.json", "state.json")
        or name.startswith(".offdpo-")
        or name.startswith(PARQUET_FILE_NAME)
        or (name.startswith("data-") and name.endswith(".arrow"))
    )


def _parquet_to_disk(parquet_path: Path, out: Path, description: str) -> None:
    """Convert the streamed Parquet file to the save_to_disk layout, batch by batch (memory-mapped Arrow)."""
    from datasets import Dataset, DatasetInfo, Features

    arrow_path = out / ".offdpo-export.arrow"
    pf = pq.ParquetFile(parquet_path)
    schema = TRL_SCHEMA
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in pf.iter_batches(batch_size=1024):
            writer.write_batch(batch.cast(schema) if batch.schema != schema else batch)
    info = DatasetInfo(description=description, features=Features.from_arrow_schema(schema))
    staging = out / ".offdpo-staging"
    Dataset.from_file(str(arrow_path), info=info).save_to_disk(str(staging))
    for child in staging.iterdir():
        child.rename(out / child.name)
    staging.rmdir()
    arrow_path.unlink()
    parquet_path.unlink()


def load_trl_dataset(path: str | Path, cache_dir: str | Path | None = None):
    """Open an export (either format) as a `datasets.Dataset` with the fingerprint in `info.description`.

    Parquet is converted once into `datasets`' memory-mapped Arrow cache (`cache_dir`, default the
    Hugging Face cache), so opening it does not load the data into memory either.
    """
    from datasets import Dataset, load_from_disk

    path = Path(path)
    parquet = path / PARQUET_FILE_NAME if path.is_dir() else path
    if parquet.suffix == ".parquet" and parquet.exists():
        meta = pq.read_schema(parquet).metadata or {}
        if PARQUET_FINGERPRINT_KEY not in meta:
            raise ExportError(f"{parquet} carries no offdpo.fingerprint metadata: export it with offdpo export-trl")
        fp = json_format.Parse(meta[PARQUET_FINGERPRINT_KEY], records_pb2.ReferenceFingerprint())
        dataset = Dataset.from_parquet(str(parquet), cache_dir=str(cache_dir) if cache_dir else None)
        dataset.info.description = _description(fp, str(parquet), dataset.num_rows)
        return dataset
    if not path.is_dir():
        raise ExportError(f"{path} is not an export (no {PARQUET_FILE_NAME}, no save_to_disk folder)")
    return load_from_disk(str(path))
