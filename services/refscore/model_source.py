"""A reference model served from object storage: a trainer checkpoint in S3 as refscore's model.

    OFFDPO_REFSCORE_MODEL_DIR=s3://<bucket>/runs/<run>/checkpoints/step-<N>/model/

The model folder (services/trainer/checkpoint.py's layout: save_pretrained's weights, config and
tokenizer) is downloaded once into a local cache folder (OFFDPO_REFSCORE_MODEL_CACHE) and then
loaded like any local folder; its fingerprint (offdpo/fingerprint.py) is computed from the downloaded
files, so a checkpoint's weights never pass for the base model's.

- **Cache key**: sha256 over the object listing (relative name, size, etag of each object), so a
  checkpoint rewritten under the same key (other bytes: other etag) is downloaded again, and the same
  checkpoint is downloaded once however often refscore restarts. A folder is complete only once
  renamed into place (downloads go to a temporary sibling first): a crash mid-download leaves nothing
  that is reused.
- **Integrity**: each object's size, and its MD5 where the etag is a plain MD5 (a single-part upload),
  are checked after download.
- **Safety**: like the trainer's checkpoint download, every key must name a plain relative path under
  the prefix (no '..', no absolute path, no empty or hidden segment): UnsafeModelSource otherwise,
  before anything is written.
- **Completeness**: no `config.json`, no weights (`*.safetensors`) or no tokenizer ->
  ModelSourceIncomplete naming the URI and what is missing, before anything is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from offdpo import errors
from offdpo.config import S3Config
from offdpo.s3 import ObjectStore, safe_key_part

log = logging.getLogger(__name__)

S3_SCHEME = "s3://"
# Any one of these makes a tokenizer transformers can load (with tokenizer_config.json beside it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
COMPLETE = ".offdpo-download.json"  # written last inside a cache folder: the listing it holds


class UnsafeModelSource(errors.ConfigError):
    """An S3 model URI or one of its object keys that would lead outside the prefix or the cache folder."""


class ModelSourceIncomplete(errors.ConfigError):
    """The S3 prefix is not a loadable model folder (no objects, no config, no weights or no tokenizer)."""


class ModelSourceCorrupt(errors.ConfigError):
    """A downloaded object does not match its listing (size or MD5)."""


@dataclass(frozen=True)
class S3ModelUri:
    bucket: str
    prefix: str  # ends with '/'

    @property
    def uri(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}"

    def default_model_id(self) -> str:
        """The name recorded in the fingerprint: '<run>@<checkpoint>' for a trainer checkpoint
        (runs/<run>/checkpoints/<name>/model/), else the prefix's segments joined with '@'."""
        parts = self.prefix.rstrip("/").split("/")
        if len(parts) == 5 and parts[0] == "runs" and parts[2] == "checkpoints" and parts[4] == "model":
            return f"{parts[1]}@{parts[3]}"
        return "@".join(parts)


def is_s3_uri(value: str) -> bool:
    return value.startswith(S3_SCHEME)


def parse_s3_uri(value: str) -> S3ModelUri:
    """`s3://bucket/prefix/` -> its parts; UnsafeModelSource for anything but plain safe segments."""
    if not is_s3_uri(value):
        raise UnsafeModelSource(f"{value!r} is not an s3:// URI")
    bucket, _, prefix = value[len(S3_SCHEME) :].partition("/")
    prefix = prefix.rstrip("/")
    problem = ""
    if not bucket or not prefix:
        problem = "it needs a bucket and a prefix: s3://<bucket>/runs/<run>/checkpoints/step-<N>/model/"
    else:
        try:
            safe_key_part(bucket, "bucket")
            for part in prefix.split("/"):
                safe_key_part(part, "prefix segment")
        except ValueError as exc:
            problem = str(exc)
    if problem:
        raise UnsafeModelSource(f"model URI {value!r}: {problem}")
    return S3ModelUri(bucket, prefix + "/")


@dataclass(frozen=True)
class ListedObject:
    rel: str  # path under the prefix
    key: str
    size: int
    etag: str


def listing_key(objects: list[ListedObject]) -> str:
    """The cache key: sha256 over (name, size, etag) of every object, in name order."""
    h = hashlib.sha256()
    for obj in sorted(objects, key=lambda o: o.rel):
        h.update(json.dumps([obj.rel, obj.size, obj.etag]).encode() + b"\n")
    return h.hexdigest()


def _check_rel(uri: S3ModelUri, key: str) -> str:
    if not key.startswith(uri.prefix):
        raise UnsafeModelSource(f"object {key!r} listed under {uri.uri} is not under its prefix: refusing it")
    rel = key[len(uri.prefix) :]
    try:
        for part in rel.split("/"):
            safe_key_part(part, "file name")
    except ValueError as exc:
        raise UnsafeModelSource(
            f"object {key!r} under {uri.uri} is not a plain relative file name ({exc}): refusing to download it "
            f"(it could be written outside the cache folder)"
        ) from None
    return rel


def list_model(store: ObjectStore, uri: S3ModelUri) -> list[ListedObject]:
    """The objects of the model folder, checked to be safe and a complete model (before any download)."""

    def listing() -> list[Any]:
        return list(store.client.list_objects(uri.bucket, prefix=uri.prefix, recursive=True))

    raw = store._retry(f"list {uri.uri}", listing)
    objects = [
        ListedObject(_check_rel(uri, o.object_name), o.object_name, int(o.size or 0), (o.etag or "").strip('"').lower())
        for o in raw
    ]
    names = {o.rel for o in objects}
    missing = []
    if "config.json" not in names:
        missing.append("config.json")
    if not any(n.endswith(".safetensors") and "/" not in n for n in names):
        missing.append("weights (*.safetensors)")
    if not names & set(TOKENIZER_FILES):
        missing.append(f"a tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    if not objects:
        raise ModelSourceIncomplete(f"{uri.uri} holds no objects: no model to serve (check the bucket and prefix)")
    if missing:
        raise ModelSourceIncomplete(
            f"{uri.uri} is not a loadable model folder: no {'; no '.join(missing)}. A checkpoint without its "
            f"tokenizer cannot score text: save it next to the weights (tokenizer.save_pretrained, as the "
            f"trainer does) or serve a folder that has one"
        )
    return objects


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "offdpo-refscore-models"


def fetch_model(
    uri: S3ModelUri,
    cache_dir: str | Path,
    s3: S3Config | None = None,
    store: ObjectStore | None = None,
    on_download: Callable[[str], None] | None = None,
) -> Path:
    """The model folder of `uri` in the local cache (downloaded when not already there); its path."""
    store = store or ObjectStore(s3 or S3Config.from_env(), bucket=uri.bucket)
    if store.bucket != uri.bucket:
        store = ObjectStore(store.cfg, bucket=uri.bucket)
    objects = list_model(store, uri)
    root = Path(cache_dir).resolve()
    final = root / listing_key(objects)
    if (final / COMPLETE).is_file():
        log.info("model %s: cached in %s", uri.uri, final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".partial-{uuid.uuid4().hex}"
    try:
        for obj in objects:
            path = (tmp / obj.rel).resolve()
            if not path.is_relative_to(tmp.resolve()):  # _check_rel already refused this; belt and braces
                raise UnsafeModelSource(f"object {obj.key!r} would be written outside {tmp}")
            if on_download is not None:
                on_download(obj.key)
            data = store.get_bytes(obj.key)
            _verify(uri, obj, data)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (tmp / COMPLETE).write_text(
            json.dumps({"uri": uri.uri, "objects": [[o.rel, o.size, o.etag] for o in objects]}, indent=1)
        )
        try:
            os.rename(tmp, final)
        except OSError:  # another process put the same listing in place first: theirs is as good
            if not (final / COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("model %s: %d objects downloaded into %s", uri.uri, len(objects), final)
    return final


def _verify(uri: S3ModelUri, obj: ListedObject, data: bytes) -> None:
    if len(data) != obj.size:
        raise ModelSourceCorrupt(
            f"{uri.uri}{obj.rel}: downloaded {len(data)} bytes, the listing says {obj.size} (rewritten meanwhile?)"
        )
    if _PLAIN_MD5.match(obj.etag) and hashlib.md5(data, usedforsecurity=False).hexdigest() != obj.etag:
        raise ModelSourceCorrupt(f"{uri.uri}{obj.rel}: MD5 of the downloaded bytes differs from its etag {obj.etag}")


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # a local folder
    model_id: str | None  # the fingerprint's model_id when not configured (None: the folder's name)
    source: str  # what was configured (a local path or the s3:// URI)


def resolve_model(model_dir: str, cache_dir: str = "", s3: S3Config | None = None) -> ResolvedModel:
    """A local folder for OFFDPO_REFSCORE_MODEL_DIR: itself, or an S3 checkpoint's cached download."""
    if not is_s3_uri(model_dir):
        return ResolvedModel(Path(model_dir), None, model_dir)
    uri = parse_s3_uri(model_dir)
    path = fetch_model(uri, cache_dir or default_cache_dir(), s3)
    return ResolvedModel(path, uri.default_model_id(), uri.uri)
