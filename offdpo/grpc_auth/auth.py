"""Caller identity: the auth file's schema, and the token store that authenticates callers.

The auth file (YAML or JSON; at most 1 MiB; re-read when it changes, for Secret rotation):

    teams:
      alignment:                       # team name: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}
        token_sha256: [<64 hex>, ...]  # sha256(token) of each valid token (several: rotation)
        client_cn: [alignment-trainer] # optional: mTLS client certificates whose subject CN is one of
                                       #   these authenticate as this team too (needs the client CA set)
        methods: [Score, GetModelInfo] # optional, default: every method of the service
        models: [offdpo-reference]     # optional, default: any model (refscore: the fingerprint's model_id)
        max_concurrent: 4              # optional, 0 = unlimited
        tokens_per_minute: 200000      # optional, 0 = unlimited (refscore: prompt+answer tokens)

A team needs at least one of token_sha256 and client_cn. Make a token:
`python -c "import secrets; print(secrets.token_urlsafe(32))"`; its hash: `printf %s "$TOKEN" | sha256sum`.
The file holds only hashes, never a token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import re
import time

from offdpo.errors import ConfigError
from offdpo.grpc_auth.files import read_limited

log = logging.getLogger(__name__)

TEAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
UNAUTHENTICATED_CALLER = "-"  # metrics label of callers that did not authenticate
_FIELDS = frozenset({"token_sha256", "client_cn", "methods", "models", "max_concurrent", "tokens_per_minute"})


@dataclasses.dataclass(frozen=True)
class Team:
    name: str
    token_hashes: tuple[bytes, ...] = ()
    methods: frozenset[str] | None = None  # None: every method
    models: frozenset[str] | None = None  # None: any model
    max_concurrent: int = 0  # 0: unlimited
    tokens_per_minute: int = 0  # 0: unlimited
    client_cns: frozenset[str] = frozenset()  # mTLS client certificate subject CNs of this team

    def __repr__(self) -> str:  # never print the hashes either
        return f"Team({self.name!r})"

    def model_refusal(self, model_id: str) -> str | None:
        """Why this team may not use `model_id` (the auth file's `models`), or None when it may."""
        if self.models is None or model_id in self.models:
            return None
        allowed = ", ".join(sorted(self.models)) or "none"
        return f"team {self.name!r} may not use model {model_id!r}; allowed: {allowed}"


ANONYMOUS = Team("anonymous")


def token_hash(token: str) -> str:
    """The hex sha256 of a token, as the auth file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


# -- the file's schema ----------------------------------------------------------------------------
def _names(value: object, what: str, allowed: frozenset[str] | None = None) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{what} must be a list of names")
    if allowed is not None and set(value) - allowed:
        raise ConfigError(f"{what} names unknown methods {sorted(set(value) - allowed)}; known: {sorted(allowed)}")
    return frozenset(value)


def _count(value: object, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{what} must be an integer >= 0 (0 = unlimited)")
    return value


def _token_hashes(value: object, what: str, required: bool) -> tuple[bytes, ...]:
    if value is None and not required:
        return ()
    hashes = [value] if isinstance(value, str) else value
    if (
        not isinstance(hashes, list)
        or not hashes
        or not all(isinstance(h, str) and HEX64.match(h.lower()) for h in hashes)
    ):
        raise ConfigError(f"{what}.token_sha256 must be one or more sha256 hex digests (never the token itself)")
    return tuple(bytes.fromhex(h) for h in hashes)


def _team(name: object, spec: object, where: str, methods: frozenset[str] | None) -> Team:
    if not isinstance(name, str) or not TEAM_NAME.match(name) or name in (ANONYMOUS.name, UNAUTHENTICATED_CALLER):
        raise ConfigError(
            f"{where}: team name {str(name)[:70]!r} must match {TEAM_NAME.pattern} and not be 'anonymous'"
        )
    what = f"{where}: teams.{name}"
    if not isinstance(spec, dict) or set(spec) - _FIELDS:
        raise ConfigError(f"{what} must be a mapping with keys among {sorted(_FIELDS)}")
    cns = _names(spec.get("client_cn"), f"{what}.client_cn") or frozenset()
    return Team(
        name,
        _token_hashes(spec.get("token_sha256"), what, required=not cns),
        _names(spec.get("methods"), f"{what}.methods", methods),
        _names(spec.get("models"), f"{what}.models"),
        _count(spec.get("max_concurrent"), f"{what}.max_concurrent"),
        _count(spec.get("tokens_per_minute"), f"{what}.tokens_per_minute"),
        cns,
    )


def parse_auth(data: bytes, where: str, methods: frozenset[str] | None = None) -> dict[str, Team]:
    """Teams by name. `methods`: the service's method names (a team naming another is an error)."""
    import yaml

    try:
        doc = yaml.safe_load(data.decode("utf-8"))  # safe_load: plain data only (JSON is YAML too)
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where}: not valid YAML/JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or set(doc) != {"teams"} or not isinstance(doc["teams"], dict) or not doc["teams"]:
        raise ConfigError(f"{where}: expected a mapping with one key, 'teams', mapping team names to settings")
    teams: dict[str, Team] = {}
    seen: set[bytes] = set()
    seen_cns: set[str] = set()
    for name, spec in doc["teams"].items():
        team = _team(name, spec, where, methods)
        if seen & set(team.token_hashes):
            raise ConfigError(
                f"{where}: teams.{team.name}.token_sha256 repeats a hash used elsewhere: each token belongs to one team"
            )
        if seen_cns & team.client_cns:
            raise ConfigError(
                f"{where}: teams.{team.name}.client_cn repeats {sorted(seen_cns & team.client_cns)}: "
                f"each certificate subject belongs to one team"
            )
        seen |= set(team.token_hashes)
        seen_cns |= team.client_cns
        teams[team.name] = team
    return teams


# -- the store ------------------------------------------------------------------------------------
class TokenStore:
    """Teams by token hash and certificate CN, from the auth file; re-read (at most every `reload_s`)
    when it changes. An invalid new file is logged and the previous teams are kept."""

    def __init__(
        self,
        path: str,
        reload_s: float = 5.0,
        *,
        methods: frozenset[str] | None = None,
        var: str = "auth file",
        service: str = "gRPC",
    ):
        self.path = path
        self.reload_s = reload_s
        self.methods = methods
        self.var = var
        self.service = service
        self._stamp = self._stat()
        self.teams = self._read()
        self._checked = time.monotonic()
        log.info("%s auth: %d team(s) from %s: %s", service, len(self.teams), path, ", ".join(sorted(self.teams)))

    def _read(self) -> dict[str, Team]:
        return parse_auth(read_limited(self.path, self.var), f"{self.var}={self.path!r}", self.methods)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_s:
            return
        self._checked = now
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return
        try:
            teams = self._read()
        except ConfigError as exc:
            log.error("%s: auth file changed but is invalid; keeping the previous teams: %s", self.service, exc)
            return
        self._stamp, self.teams = stamp, teams
        log.info("%s auth reloaded: %d team(s): %s", self.service, len(teams), ", ".join(sorted(teams)))

    def authenticate(self, token: str) -> Team | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for team in self.teams.values():  # compare against every hash: no early exit
            for h in team.token_hashes:
                if hmac.compare_digest(digest, h):
                    found = team
        return found

    def by_client_cn(self, cn: str) -> Team | None:
        """The team an mTLS client certificate's subject CN is mapped to (the CA already verified it)."""
        for team in self.teams.values():
            if cn in team.client_cns:
                return team
        return None
