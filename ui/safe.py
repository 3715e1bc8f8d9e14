"""Show untrusted text (answers, passages, file names, error messages) as text, never markup.

Streamlit renders ``st.markdown``, ``st.error``, captions and most widget labels as Markdown.
Answers, cited passages and file names come from documents and from a model, so they may hold
``<script>``, ``<img onerror=...>``, Markdown links or Streamlit's ``:red[...]`` directives.
:func:`md` backslash-escapes every ASCII punctuation character (CommonMark lets any of them be
escaped), so the Markdown renderer shows each character as it is: no HTML, no links, no
emphasis, no directives, no LaTeX. The UI never passes ``unsafe_allow_html``.
"""

from __future__ import annotations

import re

# Every ASCII punctuation character: !"#$%&'()*+,-./ :;<=>?@ [\]^_` {|}~
_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
_LINE_BREAK = re.compile(r"\r\n?|\n")


def md(text: object) -> str:
    """``text`` as Markdown that renders literally; line breaks are kept."""
    lines = _LINE_BREAK.split(str(text))
    # A leading indent would turn a line into a code block; a trailing double space is a break.
    escaped = [escape(line.strip()) for line in lines]
    return "  \n".join(escaped)


def escape(fragment: str) -> str:
    """A piece of one line as literal Markdown, spaces kept (for building a line from pieces;
    the caller strips the line's ends and handles line breaks, as :func:`md` does)."""
    return _PUNCTUATION.sub(r"\\\1", " ".join(_LINE_BREAK.split(fragment)))


def label(text: object, limit: int = 120) -> str:
    """A one-line widget label (expander, button) that renders ``text`` literally."""
    flat = " ".join(str(text).split())
    if len(flat) > limit:
        flat = flat[: limit - 1] + "…"
    return md(flat)
