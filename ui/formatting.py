"""Small pure helpers that turn service replies into short UI text."""

from __future__ import annotations

import re
import time
from pathlib import PurePosixPath
from typing import Any

from appliance.core.errors import ServiceError

_REFUSED = re.compile(r"^the core service refused \S+ \S+: ")


def error_text(exc: ServiceError) -> str:
    """The service's reason, without the transport prefix, as a sentence."""
    text = _REFUSED.sub("", str(exc)).strip() or "the core service refused the request"
    return text[0].upper() + text[1:]


def file_name(path: str) -> str:
    return PurePosixPath(path).name or path


def source_title(source: dict[str, Any]) -> str:
    """``[1] contract.md, page 3`` or ``[2] leave.md, Annual leave``; text read from a scan
    says so: ``[3] signed.pdf, page 2 (OCR, 91% confidence)``."""
    title = f"[{source.get('number', '?')}] {file_name(str(source.get('path', '')))}"
    if source.get("page") is not None:
        title = f"{title}, page {source['page']}"
    elif source.get("heading"):
        title = f"{title}, {source['heading']}"
    confidence = source.get("ocr_confidence")
    if confidence is not None:
        title = f"{title} (OCR, {float(confidence):.0%} confidence)"
    return title


def when(timestamp: float | None) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM``; empty for None."""
    if timestamp is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(float(timestamp)))


def collection_label(collection: str) -> str:
    """Documents at the top of the folder form the shared collection ``""``."""
    return collection or "(shared: top level)"
