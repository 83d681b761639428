"""Sign-in for annotators: a token from a Secret, sessions in the queue's SQLite, CSRF on every POST.

The tokens file (mounted from a Kubernetes Secret) holds `annotator_id:sha256hex` lines: only hashes
are on disk, so reading the file does not reveal a token. A session is a random id in an HttpOnly,
SameSite=Strict, Secure cookie (Secure dropped only with OFFDPO_ANNOTATE_INSECURE_COOKIES, for plain
http on localhost); the server keeps only its hash, with the annotator and the session's CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

from offdpo.errors import ConfigError

SESSION_COOKIE = "offdpo_annotate"
LOGIN_COOKIE = "offdpo_annotate_login"  # the sign-in form's CSRF token (there is no session yet)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def same(a: str, b: str) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


class Tokens:
    """sha256(token) -> annotator id, from the tokens file."""

    def __init__(self, by_hash: dict[str, str]):
        if not by_hash:
            raise ConfigError("no annotator tokens: set OFFDPO_ANNOTATE_TOKENS to a file of annotator_id:sha256 lines")
        self._by_hash = by_hash

    @classmethod
    def load(cls, path: str) -> Tokens:
        if not path:
            raise ConfigError("OFFDPO_ANNOTATE_TOKENS is not set: name the file of annotator_id:sha256(token) lines")
        by_hash: dict[str, str] = {}
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            who, sep, digest = line.rpartition(":")
            digest = digest.strip().lower()
            if not sep or not who.strip() or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ConfigError(f"{path}:{n}: expected annotator_id:<64 hex sha256 of the token>")
            by_hash[digest] = who.strip()
        return cls(by_hash)

    def annotator(self, token: str) -> str | None:
        digest = hash_token(token.strip())
        for known, who in self._by_hash.items():  # constant time per entry, no early exit on a prefix
            if hmac.compare_digest(known, digest):
                return who
        return None
