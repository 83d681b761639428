"""Reading the small files security settings name (PEM files, the auth file): size-limited, and
errors that name the variable without echoing the content (it may be a key)."""

from __future__ import annotations

import os

from offdpo.config import ConfigError

MAX_FILE_BYTES = 1 << 20


def read_limited(path: str, var: str, limit: int = MAX_FILE_BYTES) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise ConfigError(f"{var}={path!r} is {size} bytes; the limit is {limit}")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{var}={path!r} cannot be read: {exc.strerror}") from None
