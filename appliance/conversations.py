"""Conversations: their history in SQLite, and follow-up questions made standalone.

A follow-up ("and in the previous quarter?", "who approves it?") is searched together with the
earlier question it depends on, so retrieval sees what the user means. The rewrite is a rule,
not a model call: a small local model rewrites unreliably, and a rule is predictable and fast.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core import sqlite

_REFERRING = re.compile(
    r"\b(it|its|they|them|their|this|that|these|those|he|she|his|her|there|the same|above|"
    r"previous|former|latter)\b",
    re.IGNORECASE,
)
_CONNECTIVE = re.compile(r"^\s*(and|but|or|also|what about|how about|then|so)\b", re.IGNORECASE)
_NAME = re.compile(r"(?<!^)(?<![.?!]\s)\b[A-Z][\w&.-]*")


@dataclass(frozen=True)
class Exchange:
    question: str
    answer: str


def standalone_question(question: str, history: Sequence[Exchange], turns: int = 3) -> str:
    """The query to search for ``question`` given the conversation so far."""
    if not history or turns == 0:
        return question
    # A follow-up leans on what came before: it opens with a connective, or it is short, or
    # it refers back with a pronoun without naming anything itself.
    leaning = (
        _CONNECTIVE.search(question)
        or len(question.split()) <= 4
        or (_REFERRING.search(question) and not _NAME.search(question))
    )
    return f"{history[-1].question} {question}" if leaning else question


_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, user TEXT NOT NULL, title TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT, conversation TEXT NOT NULL
        REFERENCES conversations(id) ON DELETE CASCADE,
    question TEXT NOT NULL, answer TEXT NOT NULL, sources TEXT NOT NULL, abstained INTEGER NOT NULL,
    model TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, message INTEGER NOT NULL, user TEXT NOT NULL,
    rating TEXT NOT NULL, comment TEXT NOT NULL, question TEXT NOT NULL, answer TEXT NOT NULL,
    sources TEXT NOT NULL, model TEXT NOT NULL, created REAL NOT NULL,
    UNIQUE (message, user));
CREATE INDEX IF NOT EXISTS conversations_by_user ON conversations (user, updated);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation, id);
"""

VERIFICATION = ("claims", "unsupported_claims", "mode")
"""Fields of a checked answer kept with its message (as one JSON column, ``verification``,
added to databases made before answers were checked; their old messages have ``{}``)."""


class ConversationStore:
    """Conversation history per user, in ``DATA/conversations.sqlite3``."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite.connect(path, _SCHEMA)
        self._lock = threading.Lock()
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(messages)")}
        if "verification" not in columns:
            try:
                self._db.execute(
                    "ALTER TABLE messages ADD COLUMN verification TEXT NOT NULL DEFAULT '{}'"
                )
            except sqlite3.OperationalError as exc:  # another process added it just now
                if "duplicate column" not in str(exc):
                    raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, user: str, title: str) -> str:
        conversation = uuid.uuid4().hex
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?, ?)",
                (conversation, user, title[:120] or "New conversation", now, now),
            )
        return conversation

    def conversations(self, user: str) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, title, created, updated FROM conversations WHERE user = ? "
                "ORDER BY updated DESC",
                (user,),
            ).fetchall()
        return [{"id": r[0], "title": r[1], "created": r[2], "updated": r[3]} for r in rows]

    def _owned(self, user: str, conversation: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM conversations WHERE id = ? AND user = ?", (conversation, user)
        ).fetchone()
        return row is not None

    def add(self, user: str, conversation: str, answer: dict[str, Any]) -> int:
        """Store one exchange; returns its message id (feedback refers to it)."""
        with self._lock:
            if not self._owned(user, conversation):
                raise KeyError(f"no conversation {conversation} for user {user}")
            now = time.time()
            cursor = self._db.execute(
                "INSERT INTO messages (conversation, question, answer, sources, abstained, model, "
                "created, verification) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    conversation,
                    answer["question"],
                    answer["answer"],
                    json.dumps(answer.get("sources", [])),
                    int(bool(answer.get("abstained"))),
                    str(answer.get("model", "")),
                    now,
                    json.dumps({k: answer[k] for k in VERIFICATION if k in answer}),
                ),
            )
            self._db.execute(
                "UPDATE conversations SET updated = ? WHERE id = ?", (now, conversation)
            )
            return int(cursor.lastrowid or 0)

    def messages(self, user: str, conversation: str) -> list[dict[str, Any]]:
        with self._lock:
            if not self._owned(user, conversation):
                raise KeyError(f"no conversation {conversation} for user {user}")
            rows = self._db.execute(
                "SELECT id, question, answer, sources, abstained, model, created, verification "
                "FROM messages WHERE conversation = ? ORDER BY id",
                (conversation,),
            ).fetchall()
        return [
            {
                "id": r[0],
                "question": r[1],
                "answer": r[2],
                "sources": json.loads(r[3]),
                "abstained": bool(r[4]),
                "model": r[5],
                "created": r[6],
                **json.loads(r[7]),
            }
            for r in rows
        ]

    def add_feedback(self, user: str, message: int, rating: str, comment: str) -> None:
        """Thumbs up or down on one of the user's answers, stored with the question, the
        answer, its sources and the model that gave it (the preference data for fine-tuning).
        A second rating of the same answer replaces the first."""
        with self._lock:
            row = self._db.execute(
                "SELECT m.question, m.answer, m.sources, m.model FROM messages m "
                "JOIN conversations c ON c.id = m.conversation WHERE m.id = ? AND c.user = ?",
                (message, user),
            ).fetchone()
            if row is None:
                raise KeyError(f"no answer {message} for user {user}")
            self._db.execute(
                "INSERT INTO feedback (message, user, rating, comment, question, answer, sources, "
                "model, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (message, user) "
                "DO UPDATE SET rating = excluded.rating, comment = excluded.comment, "
                "created = excluded.created",
                (message, user, rating, comment, *row, time.time()),
            )

    def feedback(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT message, user, rating, comment, question, answer, sources, model, created "
                "FROM feedback ORDER BY id"
            ).fetchall()
        keys = ("message", "user", "rating", "comment", "question", "answer", "sources", "model")
        return [
            {**dict(zip(keys, r[:8], strict=True)), "sources": json.loads(r[6]), "created": r[8]}
            for r in rows
        ]

    def feedback_stats(self) -> dict[str, Any]:
        with self._lock:
            rows = self._db.execute(
                "SELECT model, rating, count(*) FROM feedback GROUP BY model, rating"
            ).fetchall()
        totals = {"up": 0, "down": 0}
        by_model: dict[str, dict[str, int]] = {}
        for model, rating, n in rows:
            totals[rating] = totals.get(rating, 0) + n
            by_model.setdefault(model, {"up": 0, "down": 0})[rating] = n
        return {"up": totals["up"], "down": totals["down"], "by_model": by_model}

    def history(self, user: str, conversation: str) -> list[Exchange]:
        return [Exchange(m["question"], m["answer"]) for m in self.messages(user, conversation)]

    def rename(self, user: str, conversation: str, title: str) -> None:
        with self._lock:
            if not self._owned(user, conversation):
                raise KeyError(f"no conversation {conversation} for user {user}")
            self._db.execute(
                "UPDATE conversations SET title = ? WHERE id = ?", (title[:120], conversation)
            )

    def delete(self, user: str, conversation: str) -> None:
        with self._lock:
            if not self._owned(user, conversation):
                raise KeyError(f"no conversation {conversation} for user {user}")
            self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation,))
