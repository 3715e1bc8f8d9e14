"""The ground every package stands on: the interfaces and plain data passed between parts
(``protocols``), the typed settings tree (``settings``, ``chat_settings``), the error hierarchy
(``errors``), the sandboxed chat template (``chat_template``), file hashing, SQLite
connections and the offline guard. It imports no other package of ours (tests/test_layers.py
checks), so ``ingest`` and ``finetune`` may import it."""
