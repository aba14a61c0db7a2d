"""Files written atomically (temp file in the same folder + rename) and never over an input.

Missing parent folders of an output are created; when the write fails, the folders created for it are
removed again, so a failed command leaves nothing behind. Every new file gets the mode a plain ``open()``
would give it (0666 less the umask); a file written over keeps its mode.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Sequence

from .errors import InputDataError

__all__ = ["check_output_path", "check_distinct_outputs", "atomic_path", "atomic_write_bytes", "atomic_write_text",
           "new_file_mode"]


def _existing_ancestor(folder: str) -> str:
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return folder


def check_output_path(path: str | os.PathLike, protect: Sequence[str | os.PathLike | None] = ()) -> str:
    """Refuse an output path that is one of the inputs, a folder, or under a file or an unwritable folder.
    Returns the real path. A missing parent folder is fine (``atomic_path`` creates it)."""
    path = os.fspath(path) if path is not None else ""
    if not path:
        raise InputDataError("the output path is empty")
    real = os.path.realpath(path)
    for source in protect:
        if source and os.path.realpath(os.fspath(source)) == real:
            raise InputDataError(f"output path {path!r} is the input file {os.fspath(source)!r}: choose another output path")
    if os.path.isdir(real):
        raise InputDataError(f"output path {path!r} is a folder; give a file name")
    folder = os.path.dirname(real)
    ancestor = _existing_ancestor(folder)
    if not os.path.isdir(ancestor):
        raise InputDataError(f"cannot write {path!r}: {ancestor!r} is a file, not a folder; choose another output path")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputDataError(f"cannot write {path!r}: folder {ancestor!r} is not writable; choose another output path")
    return real


def check_distinct_outputs(**outputs: str | os.PathLike | None) -> None:
    """Refuse two outputs naming the same file: ``check_distinct_outputs(out=a, report=b)``."""
    seen: dict[str, str] = {}
    for flag, path in outputs.items():
        if not path:
            continue
        real = os.path.realpath(os.fspath(path))
        if real in seen:
            raise InputDataError(
                f"--{seen[real]} and --{flag} both name {os.fspath(path)!r}: the two outputs collide; give two different paths"
            )
        seen[real] = flag.replace("_", "-")


def new_file_mode() -> int:
    """0666 less the process umask: the mode ``open(path, "w")`` gives a new file."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _mode_for(path: str) -> int:
    """The existing file's mode, or 0666 less the umask for a new file."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    return new_file_mode()


def _make_folders(folder: str) -> list[str]:
    """Create ``folder`` and its missing parents; return the folders created, deepest first."""
    created = []
    while not os.path.exists(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    for path in reversed(created):
        try:
            os.mkdir(path)
        except FileExistsError:  # created meanwhile by someone else: not ours to remove
            created.remove(path)
    return created


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, protect: Sequence[str | os.PathLike | None] = ()) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error (Ctrl-C included) it is
    removed, together with the folders created for it."""
    real = check_output_path(path, protect)
    created: list[str] = []
    ok = False
    tmp = None
    try:
        try:
            created = _make_folders(os.path.dirname(real))
            # the temp file keeps the extension: writers that check it (torch.export.save, savefig) see the real one
            extension = os.path.splitext(real)[1]
            fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(real)}.", suffix=f".tmp{extension}",
                                       dir=os.path.dirname(real))
        except OSError as exc:  # read-only file system, no permission, a folder that cannot be made
            raise InputDataError(f"cannot write {os.fspath(path)!r}: {exc.strerror or exc} in folder "
                                 f"{os.path.dirname(real)!r}; choose a writable output folder") from None
        os.close(fd)
        os.chmod(tmp, _mode_for(real))  # mkstemp makes 0600; give the file the mode a plain open() would
        yield tmp
        os.replace(tmp, real)
        ok = True
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if not ok:
            for folder in created:  # deepest first; only if still empty
                with contextlib.suppress(OSError):
                    os.rmdir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, protect: Sequence[str | os.PathLike | None] = ()) -> None:
    with atomic_path(path, protect) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def atomic_write_text(path: str | os.PathLike, text: str, *, protect: Sequence[str | os.PathLike | None] = ()) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), protect=protect)
