"""Conversations keep a checked answer's claims and mode; messages stored before answers were
checked (an older database) load without them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from appliance.conversations import ConversationStore

CLAIM = {
    "text": "Leave is 27 days [1].",
    "supported": True,
    "source": 1,
    "start": 10,
    "end": 40,
    "reason": "supported",
}


def answer(**extra: object) -> dict[str, object]:
    return {"question": "How much leave?", "answer": "Leave is 27 days [1].", "sources": []} | extra


def test_claims_and_mode_come_back_with_the_message(tmp_path: Path) -> None:
    store = ConversationStore(tmp_path / "c.sqlite3")
    conversation = store.create("sam", "Leave")
    store.add("sam", conversation, answer(claims=[CLAIM], unsupported_claims=[], mode="quoted"))
    (message,) = store.messages("sam", conversation)
    assert message["claims"] == [CLAIM]
    assert message["unsupported_claims"] == []
    assert message["mode"] == "quoted"
    store.close()


def test_a_database_from_before_gains_the_column_and_old_messages_lack_the_fields(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.sqlite3"
    store = ConversationStore(path)
    conversation = store.create("sam", "Leave")
    store.close()
    db = sqlite3.connect(path)  # as the schema was: no verification column, one message
    db.execute("ALTER TABLE messages DROP COLUMN verification")
    db.execute(
        "INSERT INTO messages (conversation, question, answer, sources, abstained, model, created) "
        "VALUES (?, 'Old?', 'Old answer.', '[]', 0, 'm', 0)",
        (conversation,),
    )
    db.commit()
    db.close()

    store = ConversationStore(path)
    store.add("sam", conversation, answer(claims=[CLAIM], mode="generated"))
    old, new = store.messages("sam", conversation)
    assert "claims" not in old
    assert "mode" not in old
    assert new["claims"] == [CLAIM]
    assert new["mode"] == "generated"
    store.close()
