"""The answers of a study in SQLite (stdlib sqlite3): one transaction per answer, WAL mode, safe for several readers at once."""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import closing
from pathlib import Path

SCHEMA = """CREATE TABLE IF NOT EXISTS answers (
    reader TEXT NOT NULL,
    position INTEGER NOT NULL,
    item TEXT NOT NULL,
    cases TEXT NOT NULL,
    answer TEXT NOT NULL,
    seconds REAL,
    answered_at REAL NOT NULL,
    PRIMARY KEY (reader, position)
)"""


class AnswerStore:
    """answers.sqlite of a study folder. Every call opens its own connection, so the app's worker threads never share one."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with closing(self._connect()) as connection:
            connection.execute("PRAGMA journal_mode=WAL")  # readers keep reading while one answer is written
            with connection:
                connection.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=30)
        connection.execute("PRAGMA synchronous=FULL")  # committed means on disk, even if the machine dies next
        return connection

    def save(self, reader: str, position: int, item: str, cases: list[str], answer: dict, seconds: float | None = None) -> bool:
        """Record one answer in its own transaction; False (and nothing changed) when this position was already answered."""
        with closing(self._connect()) as connection, connection:
            cursor = connection.execute(
                "INSERT OR IGNORE INTO answers (reader, position, item, cases, answer, seconds, answered_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (reader, position, item, json.dumps(cases), json.dumps(answer), seconds, time.time()))
            return cursor.rowcount == 1

    def answered_positions(self, reader: str) -> set[int]:
        with closing(self._connect()) as connection:
            return {row[0] for row in connection.execute("SELECT position FROM answers WHERE reader = ?", (reader,))}

    def answers(self) -> list[dict]:
        """Every answer, by reader then position."""
        with closing(self._connect()) as connection:
            rows = connection.execute("SELECT reader, position, item, cases, answer, seconds, answered_at FROM answers ORDER BY reader, position")
            return [{"reader": r, "position": p, "item": i, "cases": json.loads(c), "answer": json.loads(a), "seconds": s, "answered_at": t}
                    for r, p, i, c, a, s, t in rows]


def store_of(study: str | Path) -> AnswerStore:
    return AnswerStore(Path(study) / "answers.sqlite")
