"""Object storage through the plain S3 API (minio SDK): SeaweedFS locally, MinIO in production."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Iterator
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import S3Error

from offdpo import errors, retry
from offdpo.config import S3Config

log = logging.getLogger(__name__)
T = TypeVar("T")

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]{0,199}$")


def safe_key_part(value: str, what: str = "key part") -> str:
    """Validate one path segment of an object key (no '/', no '..', no traversal via names)."""
    if not _SAFE_PART.match(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not allowed in an object key: use letters, digits, '.', '_', '=', '-' "
            f"(1-200 characters, starting with a letter or digit, no '..')"
        )
    return value


def make_minio_client(cfg: S3Config) -> Minio:
    # Short connect timeout and no urllib3-level retries: `offdpo.retry` retries with backoff and
    # logs each failure, so an S3 outage is visible rather than hidden in a 5-minute hang.
    if cfg.ca_file and not cfg.secure:
        raise errors.ConfigError("OFFDPO_S3_CA_FILE is set but OFFDPO_S3_SECURE is false: S3 would be plain HTTP")
    # HTTPS always verifies the server's certificate and host name: against the deployment's CA
    # (OFFDPO_S3_CA_FILE, e.g. a cert-manager CA mounted from a Secret) or the system CAs.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5, read=60),
        retries=False,
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=cfg.ca_file or None,
    )
    return Minio(
        cfg.endpoint,
        access_key=cfg.access_key,
        secret_key=cfg.secret_key,
        secure=cfg.secure,
        region=cfg.region,
        http_client=http,
    )


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, S3Error):
        return exc.code in ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout")
    return isinstance(exc, (urllib3.exceptions.HTTPError, OSError))


class ObjectStore:
    """A bucket, with retries and backoff on transient failures (S3 restarting, network blips)."""

    def __init__(self, cfg: S3Config, bucket: str | None = None):
        self.cfg = cfg
        self.bucket = bucket or cfg.bucket
        self.client = make_minio_client(cfg)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return retry.call(f"S3 {what}", fn, retry_if=_retryable, max_s=self.cfg.retry_max_s, logger=log)

    def ensure_bucket(self) -> None:
        def make():
            if not self.client.bucket_exists(self.bucket):
                self.client.make_bucket(self.bucket)

        self._retry(f"make_bucket {self.bucket}", make)

    def put_bytes(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str | list[str] | tuple[str]] | None = None,
    ) -> None:
        self._retry(
            f"put {key}",
            lambda: self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type, metadata=metadata
            ),
        )

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        def get():
            if max_bytes is not None:
                size = self.client.stat_object(self.bucket, key).size or 0
                if size > max_bytes:
                    raise errors.TooLarge(f"object {key} is {size} bytes, over the limit of {max_bytes}")
            resp = self.client.get_object(self.bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._retry(f"get {key}", get)

    def exists(self, key: str) -> bool:
        def stat():
            try:
                self.client.stat_object(self.bucket, key)
                return True
            except S3Error as exc:
                if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return False
                raise

        return self._retry(f"stat {key}", stat)

    def list_keys(self, prefix: str) -> list[str]:
        return self._retry(
            f"list {prefix}",
            lambda: sorted(
                obj.object_name for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True)
            ),
        )

    def iter_keys(self, prefix: str) -> Iterator[str]:
        yield from self.list_keys(prefix)

    def delete(self, key: str) -> None:
        self._retry(f"delete {key}", lambda: self.client.remove_object(self.bucket, key))
