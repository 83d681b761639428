"""Object storage through the plain S3 API (minio SDK): SeaweedFS locally, any S3 in production.

Credentials (`credentials_provider`): the static keys OFFDPO_S3_ACCESS_KEY / OFFDPO_S3_SECRET_KEY (the
default, so the local stack and key-based deployments are unchanged), or, when OFFDPO_S3_ACCESS_KEY is
set to the empty string, the AWS SDKs' default chain, read through minio's own providers:
  1. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN): keys or session credentials from
     the environment (fixed for the process: for Jobs shorter than the session);
  2. web identity (IRSA, or any STS that speaks AssumeRoleWithWebIdentity): AWS_WEB_IDENTITY_TOKEN_FILE +
     AWS_ROLE_ARN (+ AWS_ROLE_SESSION_NAME, AWS_REGION; AWS_ENDPOINT_URL_STS for a non-AWS STS);
  3. a container credentials endpoint: EKS Pod Identity (AWS_CONTAINER_CREDENTIALS_FULL_URI +
     AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE) or ECS (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI);
  4. otherwise the instance metadata service (IMDSv2: an EC2 node's instance profile).
Temporary credentials (2-4) are fetched again `REFRESH_MARGIN_S` before they expire (or at half their
lifetime, if shorter), and the minio client asks the provider before every request, so a long-running
service never signs with expired credentials; a failed refresh keeps the old ones while they are valid.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import urllib3
from minio import Minio
from minio.credentials import Credentials, EnvAWSProvider, IamAwsProvider, Provider, StaticProvider
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


# Variables of the AWS SDKs' credential chain that `credentials_provider` reads (through minio's providers,
# plus AWS_ENDPOINT_URL_STS): not OFFDPO_* settings; EKS's webhooks inject most of them into pods.
AWS_CREDENTIAL_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_REGION",
    "AWS_ENDPOINT_URL_STS",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)
# Temporary credentials are fetched again this long before they expire (minio's providers wait until
# 10 s before: one slow STS or metadata answer then fails requests).
REFRESH_MARGIN_S = 300.0


class CredentialsUnavailable(errors.Unavailable):
    """No valid S3 credentials: the credential endpoint (STS, Pod Identity agent, instance metadata) failed
    and the last credentials expired. Retried like any S3 outage."""


def _utcnow() -> datetime:
    # minio's Credentials keep `expiration` as naive UTC
    return datetime.now(UTC).replace(tzinfo=None)


class RefreshingProvider(Provider):
    """Temporary credentials from `make()`'s provider, fetched again before they expire.

    A fresh provider per fetch: minio's providers cache what they fetched until 10 s before expiry, so
    asking a new one is how a refresh happens earlier. Thread-safe (one client serves every thread)."""

    def __init__(self, make: Callable[[], Provider], margin_s: float = REFRESH_MARGIN_S, what: str = "S3 credentials"):
        self._make = make
        self._margin = timedelta(seconds=margin_s)
        self._what = what
        self._lock = threading.Lock()
        self._creds: Credentials | None = None
        self._refresh_at: datetime | None = None
        self.fetches = 0  # how many times credentials were fetched (metrics, tests)

    def retrieve(self) -> Credentials:
        with self._lock:
            now = _utcnow()
            creds = self._creds
            if creds is not None and (self._refresh_at is None or now < self._refresh_at):
                return creds
            try:
                fresh = self._make().retrieve()
            except Exception as exc:  # minio raises ValueError; urllib3/OSError when the endpoint is down
                if creds is not None and not creds.is_expired():
                    log.warning(
                        "refreshing %s failed (%s); the current ones stay valid until %s",
                        self._what,
                        exc,
                        creds.expiration,
                    )
                    return creds
                raise CredentialsUnavailable(f"cannot fetch {self._what}: {exc}") from exc
            self.fetches += 1
            self._creds = fresh
            if fresh.expiration is None:
                self._refresh_at = None  # long-lived keys (e.g. AWS_ACCESS_KEY_ID without a session)
            else:
                margin = min(self._margin, (fresh.expiration - now) / 2)
                self._refresh_at = fresh.expiration - margin
                log.info("fetched %s valid until %s (next refresh %s)", self._what, fresh.expiration, self._refresh_at)
            return fresh

    def invalidate(self) -> None:
        """Fetch again on the next request (the server said the credentials expired: clocks disagree)."""
        with self._lock:
            self._refresh_at = _utcnow()


def _credential_http_client() -> urllib3.PoolManager:
    # STS and the metadata endpoints: the system CAs (never OFFDPO_S3_CA_FILE, the object store's CA),
    # short timeouts, a few retries on 5xx (what the AWS SDKs do for these endpoints).
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=3, read=20),
        retries=urllib3.Retry(total=3, backoff_factor=0.5, status_forcelist=[500, 502, 503, 504]),
    )


def aws_default_chain(environ: dict[str, str] | None = None) -> Provider:
    """The AWS SDKs' credential chain (module docstring, steps 1-4), decided once from the environment
    and refreshed before expiry. `environ`: for tests; minio's providers read os.environ themselves."""
    env = os.environ if environ is None else environ
    if env.get("AWS_ACCESS_KEY_ID") or env.get("AWS_ACCESS_KEY"):
        return RefreshingProvider(EnvAWSProvider, what="S3 credentials from AWS_ACCESS_KEY_ID")
    http = _credential_http_client()
    sts = env.get("AWS_ENDPOINT_URL_STS") if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") else None
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") and not env.get("AWS_ROLE_ARN"):
        raise errors.ConfigError("AWS_WEB_IDENTITY_TOKEN_FILE is set without AWS_ROLE_ARN: name the role to assume")
    source = (
        "web identity (AWS_WEB_IDENTITY_TOKEN_FILE)"
        if env.get("AWS_WEB_IDENTITY_TOKEN_FILE")
        else "the container credentials endpoint"
        if env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI") or env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        else "instance metadata (IMDSv2)"
    )
    return RefreshingProvider(
        lambda: IamAwsProvider(custom_endpoint=sts, http_client=http), what=f"S3 credentials from {source}"
    )


def credentials_provider(cfg: S3Config) -> Provider:
    """Static keys when OFFDPO_S3_ACCESS_KEY is set (the default), else the AWS default chain."""
    if cfg.access_key:
        return StaticProvider(cfg.access_key, cfg.secret_key)
    return aws_default_chain()


def make_minio_client(cfg: S3Config, credentials: Provider | None = None) -> Minio:
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
        credentials=credentials or credentials_provider(cfg),
        secure=cfg.secure,
        region=cfg.region,
        http_client=http,
    )


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, S3Error):
        # ExpiredToken: temporary credentials the server saw as expired (clock skew); fetched again first
        return exc.code in ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "ExpiredToken")
    return isinstance(exc, (urllib3.exceptions.HTTPError, OSError, CredentialsUnavailable))


class ObjectStore:
    """A bucket, with retries and backoff on transient failures (S3 restarting, network blips)."""

    def __init__(self, cfg: S3Config, bucket: str | None = None, credentials: Provider | None = None):
        self.cfg = cfg
        self.bucket = bucket or cfg.bucket
        self.credentials = credentials or credentials_provider(cfg)
        self.client = make_minio_client(cfg, self.credentials)

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        def attempt() -> T:
            try:
                return fn()
            except S3Error as exc:
                if exc.code == "ExpiredToken" and isinstance(self.credentials, RefreshingProvider):
                    self.credentials.invalidate()
                raise

        return retry.call(f"S3 {what}", attempt, retry_if=_retryable, max_s=self.cfg.retry_max_s, logger=log)

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
