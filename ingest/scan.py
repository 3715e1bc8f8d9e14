"""Which files of the documents folder are documents: the folder walk and the ignore rules.

Hidden files and folders, editors' and office suites' temporary files, partial downloads and
unsupported suffixes are not documents. Symlinks are followed only when they stay inside the
folder. Paths are kept relative to the folder, in POSIX form.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ingest.safe_open import kind_problem

# Editors save by writing a temporary file and renaming it over the original; office suites keep
# lock and owner files beside an open document; browsers and copy tools write partial files.
TEMP_PATTERNS = (
    "~$*",  # MS Office owner file
    ".~lock.*#",  # LibreOffice lock file
    "*~",  # emacs, gedit backups
    "*.tmp",
    "*.temp",
    "*.swp",
    "*.swx",
    "*.swo",
    "4913",  # vim's write test
    "*.part",
    "*.partial",
    "*.crdownload",
    "*.download",
    "~*.tmp",
    "*.bak",
    "#*#",
)


@dataclass(frozen=True)
class FoundFile:
    rel: str
    path: Path
    size: int
    mtime_ns: int


def is_ignored_name(name: str) -> bool:
    return name.startswith(".") or any(fnmatch.fnmatchcase(name, p) for p in TEMP_PATTERNS)


def relative(root: Path, path: Path) -> str | None:
    """``path`` relative to ``root`` in POSIX form, or None when it is outside or ignored."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return None
    if not rel.parts or any(is_ignored_name(part) for part in rel.parts):
        return None
    return rel.as_posix()


def is_candidate(rel: str, suffixes: frozenset[str]) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return not is_ignored_name(name) and os.path.splitext(name)[1].lower() in suffixes


def inside(root: Path, path: Path) -> bool:
    """Whether ``path``, with every symlink resolved, stays inside ``root``."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def symlink_problem(root: Path, path: Path) -> str | None:
    """Why the symlink ``path`` must not be followed, or None when it stays inside its own
    top-level collection folder (a link at the root: at the root). A link out of its collection
    would hand one collection's document to the readers of another. A loop gets its own
    reason: "points outside" would send the admin looking elsewhere."""
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # RuntimeError up to 3.12, OSError (ELOOP) from 3.13
        return "symlink loop: the link never reaches a file"
    real_root = root.resolve()
    if not target.is_relative_to(real_root):
        return "symlink points outside the documents folder"
    rel = path.relative_to(root)
    if len(rel.parts) == 1:  # at the root: the shared collection, files at the top only
        if path.is_dir() or target.parent == real_root:
            return None
        return "symlink points outside the top of the documents folder (into a collection)"
    if not target.is_relative_to(real_root / rel.parts[0]):
        return "symlink points outside its collection folder"
    return None


def walk(root: Path, suffixes: frozenset[str]) -> Iterator[FoundFile | tuple[str, str]]:
    """Yield the folder's documents, and ``(rel, reason)`` for files that must be rejected."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        base = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not is_ignored_name(d))
        for name in dirnames:
            # os.walk lists a symlinked folder but never enters it; one that leaves the folder
            # (or loops) is reported, so a share linked in from elsewhere is not silently absent.
            path = base / name
            rel = relative(root, path)
            problem = symlink_problem(root, path) if path.is_symlink() else None
            if rel is not None and problem is not None:
                yield rel, problem
        for name in sorted(filenames):
            path = base / name
            rel = relative(root, path)
            if rel is None or not is_candidate(rel, suffixes):
                continue
            problem = symlink_problem(root, path) if path.is_symlink() else None
            if problem is not None:
                yield rel, problem
                continue
            try:
                st = path.stat()
            except OSError as exc:
                yield rel, f"cannot read file: {exc.strerror}"
                continue
            problem = kind_problem(st.st_mode)
            if problem is not None:  # a FIFO would hang a reader; a device never ends
                yield rel, problem
                continue
            yield FoundFile(rel=rel, path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)
