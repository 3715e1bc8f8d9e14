"""Opening a document once, safely, and reading hash and text from that same open file.

Checking a path and then opening it again (to hash, then again to parse) lets whoever can write
the documents folder swap the file for a symlink in between: to ``service.token``, to
``/dev/zero``, to another collection's document. So a document is opened exactly once:

- ``O_NOFOLLOW`` on the last component and ``O_NONBLOCK`` (a FIFO opens at once instead of
  hanging ingestion); then ``fstat`` must say *regular file*: FIFOs, devices and sockets are
  refused with a reason;
- the file actually opened (``/proc/self/fd/N``, whatever was swapped on the way) must lie in
  the document's own top-level collection folder (documents at the root: directly at the root),
  so a symlink may point within its collection but never out of it, nor out of the folder;
- its bytes are read from that descriptor once, hashed as they are read, and written to a
  private staging copy that the parser process reads: the text indexed is the text hashed.

Errors are :class:`UnsafeDocument` with a reason for ``appliance status``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from appliance.core.errors import IngestError

_BLOCK = 1 << 20
_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


class UnsafeDocument(IngestError):
    """A document that must not be read: not a regular file, or outside its collection."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def collection_root(root: Path, rel: str) -> Path:
    """The folder a document's bytes must come from: its top-level collection folder, or the
    documents folder itself for documents at the root."""
    top = rel.split("/", 1)[0] if "/" in rel else ""
    return root / top if top else root


def kind_problem(mode: int) -> str | None:
    """Why a file of this ``st_mode`` is no document, or None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file: {_KINDS.get(stat.S_IFMT(mode), 'a special file')}"


def open_document(root: Path, rel: str) -> int:
    """A read-only descriptor of ``root/rel`` that is a regular file inside its collection."""
    path = root / rel
    real = os.path.realpath(path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: the last component became a symlink after realpath
            raise UnsafeDocument("the file was replaced by a symlink while it was read") from exc
        raise UnsafeDocument(f"cannot read file: {exc.strerror}") from exc
    try:
        problem = kind_problem(os.fstat(fd).st_mode)
        if problem is not None:
            raise UnsafeDocument(problem)
        opened = Path(os.readlink(f"/proc/self/fd/{fd}"))
        home = collection_root(root, rel).resolve()
        top_level = "/" not in rel
        if not opened.is_relative_to(home) or (top_level and opened.parent != home):
            where = (
                "the documents folder"
                if not opened.is_relative_to(root.resolve())
                else (
                    "its collection folder" if not top_level else "the top of the documents folder"
                )
            )
            raise UnsafeDocument(f"symlink points outside {where}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Staging:
    """A private folder (0700, outside the data and documents folders) for the copies the
    parser process reads; each copy is removed once parsed."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="appliance-parse-"))

    def copy(self, root: Path, rel: str, *, limit: int) -> tuple[str, Path]:
        """Open ``root/rel`` once (:func:`open_document`), and copy it here while hashing:
        its sha256 and the copy's path (named after the hash, with the document's suffix)."""
        fd = open_document(root, rel)
        digest = hashlib.sha256()
        out_fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=Path(rel).suffix.lower())
        size = 0
        try:
            with os.fdopen(fd, "rb") as src, os.fdopen(out_fd, "wb") as out:
                while block := src.read(_BLOCK):
                    size += len(block)
                    if size > limit:
                        raise UnsafeDocument(
                            f"file too large (grew past {limit / 1048576:g} MB while read)"
                        )
                    digest.update(block)
                    out.write(block)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return digest.hexdigest(), Path(tmp)

    @contextlib.contextmanager
    def holding(self, path: Path) -> Iterator[Path]:
        """A copy here of a file the caller names (a test's, a tool's), for as long as needed."""
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=Path(path).suffix.lower())
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def close(self) -> None:
        if not self.folder.exists():
            return
        for path in self.folder.glob("*"):
            path.unlink(missing_ok=True)
        self.folder.rmdir()
