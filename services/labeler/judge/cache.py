"""Verdicts already paid for: a SQLite map from the question's content key to the judge's raw answer."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
from pathlib import Path


class VerdictCache:
    """Keyed by everything that decides the answer (judge model, template, mode, prompt, answers, order,
    allowed labels), so a rerun asks nothing twice and a changed template asks again. Thread-safe."""

    def __init__(self, path: str | Path | None):
        self.path = str(path) if path else ":memory:"
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL" if path else "PRAGMA journal_mode=MEMORY")
        self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, raw TEXT NOT NULL)")
        self._lock = threading.Lock()
        self.hits = 0

    @staticmethod
    def key(*parts: object) -> str:
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT raw FROM verdicts WHERE key = ?", (key,)).fetchone()
            if row is not None:
                self.hits += 1
        return row[0] if row else None

    def put(self, key: str, raw: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts (key, raw) VALUES (?, ?)", (key, raw))

    def close(self) -> None:
        self._db.close()
