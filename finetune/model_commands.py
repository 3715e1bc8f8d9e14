"""Placeholder: commands are added by the module owner."""

from __future__ import annotations

from typing import Any


def add_commands(sub: Any) -> None:  # argparse._SubParsersAction
    del sub
