"""The annotation queue, in SQLite: items, claims (with leases), judgements, skips and sessions.

An item is one comparison: a prompt and two answers (`a`, `b`: the set's first two answers). It is shown
to `overlap` annotators, never twice to the same one, and leaves the queue once that many judgements are
in. Showing an item claims it for a lease; a claim that expires (a closed tab, a crash) stops counting,
so the slot is offered again. A judgement can be undone for `undo_s` seconds; after that it is final,
and an item whose judgements are all final is decided by majority and published (by the caller).

All state lives in one SQLite file (WAL) written in short transactions under one lock, so the web
workers, the ingest thread and the publisher thread see one consistent queue, and a restart loses
nothing: an item is in the file before its Kafka offset is committed.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from offdpo import records
from offdpo.errors import BadInput
from offdpo.v1 import labeler_pb2, records_pb2

# Canonical verdicts, in terms of the stored answers (not of what was displayed where).
A, B, TIE, BAD = "a", "b", "tie", "bad"
VERDICTS = (A, B, TIE, BAD)
NO_MAJORITY = "no_majority"
# Keys on the page: 1 = the answer shown left, 2 = the one shown right, 0 = tie, b = both bad, s = skip.
KEYS = {"1": "left", "2": "right", "0": TIE, "b": BAD, "s": "skip"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
  item_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, set_id TEXT, source TEXT, prompt BLOB NOT NULL,
  answer_a TEXT NOT NULL, answer_b TEXT NOT NULL, metadata TEXT NOT NULL, created_at REAL NOT NULL,
  outcome TEXT, pair_id TEXT, decided_at REAL);
CREATE TABLE IF NOT EXISTS claims (
  item_id TEXT, annotator TEXT, claimed_at REAL, lease_until REAL, a_left INTEGER,
  PRIMARY KEY (item_id, annotator));
CREATE TABLE IF NOT EXISTS judgements (
  id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT, annotator TEXT, verdict TEXT, a_left INTEGER,
  guideline_version TEXT, time_spent_s REAL, rationale TEXT, judged_at REAL, UNIQUE (item_id, annotator));
CREATE TABLE IF NOT EXISTS skips (item_id TEXT, annotator TEXT, PRIMARY KEY (item_id, annotator));
CREATE TABLE IF NOT EXISTS sessions (sid_hash TEXT PRIMARY KEY, annotator TEXT, csrf TEXT, expires REAL);
CREATE TABLE IF NOT EXISTS judge_verdicts (
  item_id TEXT PRIMARY KEY, verdict TEXT, model TEXT, judged_at REAL);
"""


class QueueError(BadInput):
    """A judgement the queue refuses (not your item, already judged, unknown key)."""

    error_type = "invalid_judgement"


@dataclass(frozen=True)
class Item:
    item_id: str
    seq: int
    set_id: str
    source: str
    prompt: records_pb2.Prompt
    answer_a: str
    answer_b: str
    metadata: dict[str, str]
    outcome: str | None = None


@dataclass(frozen=True)
class Claim:
    item: Item
    a_left: bool  # answer a displayed on the left (first); randomised per item and annotator
    claimed_at: float

    @property
    def left(self) -> str:
        return self.item.answer_a if self.a_left else self.item.answer_b

    @property
    def right(self) -> str:
        return self.item.answer_b if self.a_left else self.item.answer_a


@dataclass(frozen=True)
class Judgement:
    item_id: str
    annotator: str
    verdict: str
    a_left: bool
    guideline_version: str
    time_spent_s: float
    rationale: str
    judged_at: float


def item_id_for(prompt: records_pb2.Prompt, a: str, b: str) -> str:
    """Content id, so the same comparison read twice (a redelivered record) is one item."""
    return records.pair_id(prompt, a, b)[:24]


def verdict_for_key(key: str, a_left: bool) -> str:
    """The canonical verdict for a key pressed on an item displayed with `a_left`."""
    what = KEYS.get(key)
    if what is None or what == "skip":
        raise QueueError(f"unknown verdict key {key!r}: use 1, 2, 0, b or s")
    if what == "left":
        return A if a_left else B
    if what == "right":
        return B if a_left else A
    return what


def majority(verdicts: list[str]) -> str:
    """The verdict more than half the annotators gave, else NO_MAJORITY."""
    if not verdicts:
        return NO_MAJORITY
    top, count = Counter(verdicts).most_common(1)[0]
    return top if count * 2 > len(verdicts) else NO_MAJORITY


class Queue:
    def __init__(self, path: str | Path, overlap: int = 2, lease_s: float = 900.0, undo_s: float = 10.0, rng=None):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self.overlap, self.lease_s, self.undo_s = overlap, lease_s, undo_s
        self._rng = rng or random.SystemRandom()
        self._lock = threading.Lock()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- items --------------------------------------------------------------------------------
    def add(self, cs: labeler_pb2.CandidateSet, source: str, now: float | None = None) -> bool:
        """Queue the set's first two answers; False if that comparison is already queued."""
        a, b = cs.answers[0], cs.answers[1]
        iid = item_id_for(cs.prompt, a, b)
        meta = dict(cs.metadata)
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM items").fetchone()[0]
            cur = db.execute(
                "INSERT OR IGNORE INTO items (item_id, seq, set_id, source, prompt, answer_a, answer_b, metadata,"
                " created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    iid,
                    seq,
                    cs.set_id,
                    source,
                    cs.prompt.SerializeToString(),
                    a,
                    b,
                    json.dumps(meta),
                    now or time.time(),
                ),
            )
            return cur.rowcount == 1

    def _item(self, row: tuple) -> Item:
        prompt = records_pb2.Prompt()
        prompt.ParseFromString(row[4])
        return Item(row[0], row[1], row[2] or "", row[3] or "", prompt, row[5], row[6], json.loads(row[7]), row[8])

    _ITEM_COLS = "item_id, seq, set_id, source, prompt, answer_a, answer_b, metadata, outcome"

    def item(self, item_id: str) -> Item | None:
        with self._lock:
            row = self._db.execute(f"SELECT {self._ITEM_COLS} FROM items WHERE item_id=?", (item_id,)).fetchone()
        return self._item(row) if row else None

    # -- claims -------------------------------------------------------------------------------
    def claim(self, annotator: str, now: float | None = None) -> Claim | None:
        """The item this annotator should judge now: the one they hold (a reload shows the same item in
        the same order), else the oldest open item with a free slot they have neither judged nor skipped."""
        now = now or time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT item_id, a_left, claimed_at FROM claims WHERE annotator=? AND lease_until>? "
                "ORDER BY claimed_at LIMIT 1",
                (annotator, now),
            ).fetchone()
            if row is None:
                pick = db.execute(
                    """SELECT i.item_id FROM items i WHERE i.outcome IS NULL
                    AND NOT EXISTS (SELECT 1 FROM judgements j WHERE j.item_id=i.item_id AND j.annotator=:who)
                    AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.item_id=i.item_id AND s.annotator=:who)
                    AND (SELECT COUNT(*) FROM judgements j WHERE j.item_id=i.item_id)
                      + (SELECT COUNT(*) FROM claims c WHERE c.item_id=i.item_id AND c.lease_until>:now
                         AND c.annotator<>:who) < :overlap
                    ORDER BY i.seq LIMIT 1""",
                    dict(who=annotator, now=now, overlap=self.overlap),
                ).fetchone()
                if pick is None:
                    return None
                a_left = self._rng.random() < 0.5
                db.execute(
                    "INSERT OR REPLACE INTO claims VALUES (?,?,?,?,?)",
                    (pick[0], annotator, now, now + self.lease_s, int(a_left)),
                )
                row = (pick[0], int(a_left), now)
            item_row = db.execute(f"SELECT {self._ITEM_COLS} FROM items WHERE item_id=?", (row[0],)).fetchone()
        return Claim(self._item(item_row), bool(row[1]), row[2])

    # -- judgements ---------------------------------------------------------------------------
    def judge(
        self,
        annotator: str,
        item_id: str,
        key: str,
        rationale: str = "",
        guideline_version: str = "",
        now: float | None = None,
    ) -> Judgement | None:
        """Record the annotator's key on the item they hold; None for a skip. QueueError when the item
        is not theirs to judge (never claimed, already judged, already full)."""
        now = now or time.time()
        with self._tx() as db:
            claim = db.execute(
                "SELECT a_left, claimed_at FROM claims WHERE item_id=? AND annotator=?", (item_id, annotator)
            ).fetchone()
            if claim is None:
                raise QueueError("this item is not assigned to you (it may have been judged already): reload")
            db.execute("DELETE FROM claims WHERE item_id=? AND annotator=?", (item_id, annotator))
            if key == "s":
                db.execute("INSERT OR IGNORE INTO skips VALUES (?, ?)", (item_id, annotator))
                return None
            verdict = verdict_for_key(key, bool(claim[0]))
            # A lease that expired may have let others fill the item meanwhile: never more than overlap.
            n = db.execute("SELECT COUNT(*) FROM judgements WHERE item_id=?", (item_id,)).fetchone()[0]
            if n >= self.overlap:
                raise QueueError("this item already has its judgements (your claim had expired): reload")
            j = Judgement(
                item_id, annotator, verdict, bool(claim[0]), guideline_version, round(now - claim[1], 3), rationale, now
            )
            try:
                db.execute(
                    "INSERT INTO judgements (item_id, annotator, verdict, a_left, guideline_version, time_spent_s,"
                    " rationale, judged_at) VALUES (?,?,?,?,?,?,?,?)",
                    (item_id, annotator, verdict, int(j.a_left), guideline_version, j.time_spent_s, rationale, now),
                )
            except sqlite3.IntegrityError:
                raise QueueError("you have already judged this item") from None
            return j

    def last_judgement(self, annotator: str) -> Judgement | None:
        with self._lock:
            row = self._db.execute(
                "SELECT item_id, annotator, verdict, a_left, guideline_version, time_spent_s, rationale, judged_at "
                "FROM judgements WHERE annotator=? ORDER BY id DESC LIMIT 1",
                (annotator,),
            ).fetchone()
        return Judgement(row[0], row[1], row[2], bool(row[3]), *row[4:]) if row else None

    def undo(self, annotator: str, now: float | None = None) -> str | None:
        """Withdraw the annotator's last judgement if it is still in its grace period (never once it is
        final, so never after publication); the item goes back to them, same order. Returns its id."""
        now = now or time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT j.id, j.item_id, j.a_left, j.time_spent_s, j.judged_at FROM judgements j "
                "JOIN items i ON i.item_id=j.item_id WHERE j.annotator=? AND i.outcome IS NULL "
                "ORDER BY j.id DESC LIMIT 1",
                (annotator,),
            ).fetchone()
            if row is None or now - row[4] >= self.undo_s:
                return None
            db.execute("DELETE FROM judgements WHERE id=?", (row[0],))
            # The item they had moved on to goes back to the queue, so the undone one is what they see.
            db.execute("DELETE FROM claims WHERE annotator=?", (annotator,))
            db.execute(
                "INSERT OR REPLACE INTO claims VALUES (?,?,?,?,?)",
                (row[1], annotator, now - row[3], now + self.lease_s, row[2]),
            )
            return str(row[1])

    def judgements(self, item_id: str) -> list[Judgement]:
        with self._lock:
            rows = self._db.execute(
                "SELECT item_id, annotator, verdict, a_left, guideline_version, time_spent_s, rationale, judged_at "
                "FROM judgements WHERE item_id=? ORDER BY id",
                (item_id,),
            ).fetchall()
        return [Judgement(r[0], r[1], r[2], bool(r[3]), *r[4:]) for r in rows]

    # -- decisions ----------------------------------------------------------------------------
    def due(self, now: float | None = None) -> list[str]:
        """Open items with all their judgements in, every one past its grace period."""
        now = now or time.time()
        with self._lock:
            rows = self._db.execute(
                "SELECT i.item_id FROM items i JOIN judgements j ON j.item_id=i.item_id WHERE i.outcome IS NULL "
                "GROUP BY i.item_id HAVING COUNT(*) >= ? AND MAX(j.judged_at) <= ? ORDER BY i.seq",
                (self.overlap, now - self.undo_s),
            ).fetchall()
        return [r[0] for r in rows]

    def decided(self, item_id: str, outcome: str, pair_id: str, now: float | None = None) -> None:
        """Called once the pair (if any) is acknowledged by Kafka: the item leaves the queue for good."""
        with self._tx() as db:
            db.execute(
                "UPDATE items SET outcome=?, pair_id=?, decided_at=? WHERE item_id=?",
                (outcome, pair_id, now or time.time(), item_id),
            )
            db.execute("DELETE FROM claims WHERE item_id=?", (item_id,))

    # -- progress and statistics --------------------------------------------------------------
    def progress(self, annotator: str, now: float | None = None) -> tuple[int, int]:
        """(judged by this annotator, items still waiting for them)."""
        now = now or time.time()
        with self._lock:
            done = self._db.execute("SELECT COUNT(*) FROM judgements WHERE annotator=?", (annotator,)).fetchone()[0]
            remaining = self._db.execute(
                """SELECT COUNT(*) FROM items i WHERE i.outcome IS NULL
                AND NOT EXISTS (SELECT 1 FROM judgements j WHERE j.item_id=i.item_id AND j.annotator=:who)
                AND NOT EXISTS (SELECT 1 FROM skips s WHERE s.item_id=i.item_id AND s.annotator=:who)
                AND (SELECT COUNT(*) FROM judgements j WHERE j.item_id=i.item_id)
                  + (SELECT COUNT(*) FROM claims c WHERE c.item_id=i.item_id AND c.lease_until>:now
                     AND c.annotator<>:who) < :overlap""",
                dict(who=annotator, now=now, overlap=self.overlap),
            ).fetchone()[0]
        return done, remaining

    def counts(self) -> dict[str, int]:
        with self._lock:
            total, decided, pairs = self._db.execute(
                "SELECT COUNT(*), COUNT(outcome), COUNT(NULLIF(pair_id, '')) FROM items"
            ).fetchone()
            judged = self._db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]
        return dict(items=total, decided=decided, open=total - decided, pairs=pairs, judgements=judged)

    def ratings(self) -> list[tuple[str, int, list[str]]]:
        """(item id, seq, verdicts in judgement order) for every item with at least one judgement."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.item_id, i.seq, j.verdict FROM items i JOIN judgements j ON j.item_id=i.item_id "
                "ORDER BY i.seq, j.id"
            ).fetchall()
        out: dict[str, tuple[str, int, list[str]]] = {}
        for iid, seq, verdict in rows:
            out.setdefault(iid, (iid, seq, []))[2].append(verdict)
        return list(out.values())

    def decided_items(self) -> list[tuple[Item, str]]:
        """Every decided item with its outcome (the human-labelled sample the judge is calibrated on)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._ITEM_COLS} FROM items WHERE outcome IS NOT NULL ORDER BY seq"
            ).fetchall()
        return [(self._item(r), r[8]) for r in rows]

    def set_judge_verdict(self, item_id: str, verdict: str, model: str, now: float | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO judge_verdicts VALUES (?,?,?,?)", (item_id, verdict, model, now or time.time())
            )

    def judge_verdicts(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute("SELECT item_id, verdict FROM judge_verdicts").fetchall())

    # -- sessions -----------------------------------------------------------------------------
    def add_session(self, sid_hash: str, annotator: str, csrf: str, expires: float) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE expires < ?", (time.time(),))
            db.execute("INSERT INTO sessions VALUES (?,?,?,?)", (sid_hash, annotator, csrf, expires))

    def session(self, sid_hash: str, now: float | None = None) -> tuple[str, str] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT annotator, csrf FROM sessions WHERE sid_hash=? AND expires>?", (sid_hash, now or time.time())
            ).fetchone()
        return (row[0], row[1]) if row else None

    def drop_session(self, sid_hash: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM sessions WHERE sid_hash=?", (sid_hash,))
