"""Files written atomically (temp file in the same folder + rename) and never over an input."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Sequence

from .errors import InputDataError

__all__ = ["check_output_path", "atomic_path", "atomic_write_bytes", "atomic_write_text"]


def check_output_path(path: str, protect: Sequence[str] = ()) -> str:
    """Refuse an output path that is one of the inputs or whose folder does not exist."""
    if not path:
        raise InputDataError("the output path is empty")
    real = os.path.realpath(path)
    for source in protect:
        if source and os.path.realpath(source) == real:
            raise InputDataError(f"output path {path!r} is the input file {source!r}: choose another output path")
    folder = os.path.dirname(real)
    if not os.path.isdir(folder):
        raise InputDataError(f"cannot write {path!r}: folder {os.path.dirname(path) or '.'!r} does not exist")
    if os.path.isdir(real):
        raise InputDataError(f"output path {path!r} is a folder; give a file name")
    return real


def _mode_for(path: str) -> int:
    """The existing file's mode, or 0666 less the umask for a new file."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str, protect: Sequence[str] = ()) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    real = check_output_path(path, protect)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp", dir=os.path.dirname(real))
    os.close(fd)
    os.chmod(tmp, _mode_for(real))  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        yield tmp
        os.replace(tmp, real)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str, data: bytes, *, protect: Sequence[str] = ()) -> None:
    with atomic_path(path, protect) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str, text: str, *, protect: Sequence[str] = ()) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), protect=protect)
