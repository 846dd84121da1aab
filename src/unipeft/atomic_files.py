"""Files written so that a reader never sees half of one: each goes to a temporary name in its folder, is
flushed to disk, then renamed over the old one; files and folders get the modes open() and mkdir would give.
"""
from __future__ import annotations

import os
import tempfile


def _temp_path(final_path: str) -> str:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(final_path) or ".")
    os.close(fd)
    honour_umask(tmp)
    return tmp


def honour_umask(path: str) -> None:
    """Give a file or folder made by tempfile (0600 / 0700) the mode a plain open() or mkdir would: 0666 or
    0777 less the process's umask, so that whoever may read the user's other files reads these too."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def write_synced(path: str, data: bytes) -> None:
    """Write `data` to `path` and wait until it is on disk (the rename that publishes it comes after)."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_temp(final_path: str, data: bytes) -> str:
    tmp = _temp_path(final_path)
    try:
        write_synced(tmp, data)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write_files(files: dict[str, bytes]) -> None:
    """Write every file to a temporary name first; rename only once all are complete.

    A failure (or interruption) before the renames leaves each previous file untouched.
    """
    temps: dict[str, str] = {}
    try:
        for path, data in files.items():
            temps[path] = _write_temp(path, data)
    except BaseException:
        for tmp in temps.values():
            os.unlink(tmp)
        raise
    for path, tmp in temps.items():
        os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_files({path: text.encode("utf-8")})
