"""Atomic writes and checked reads for everything a run leaves behind.

A file is written to a temporary file beside it and renamed into place, so a reader sees the old file or
the new one, never half of one. The temporary name carries the writer's host and process id
(``.<name>.<host>.<pid>.<random>.tmp``), so :func:`remove_orphan_temporaries` can tell the leftovers of a
killed writer from a file another live process is still writing. A full disk or a missing permission
becomes a :class:`~transfer.errors.StorageError` naming the file and the cause, never a library message
such as ``unexpected pos`` from ``torch.save``.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transfer.errors import StorageError

log = logging.getLogger(__name__)
# 0o666 less the process umask: the mode ``open()`` gives a new file (0644 under the usual umask 022). Read once
# (reading the umask means setting it, then putting it straight back): changing the umask is process-wide, not
# safe while other threads create files.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[^.]+\.tmp$")


def storage_error(path: str | os.PathLike, e: OSError) -> StorageError:
    """One line naming ``path`` and the cause; for a full disk, the free space and what to do."""
    code = errno.errorcode.get(e.errno or 0, "")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        try:
            free = f"{shutil.disk_usage(Path(path).parent).free / 2**20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        return StorageError(f"cannot write {str(path)!r}: {what} ({code}; {free}). Free some space or point "
                            "run.root at a larger disk; a run that saved a checkpoint continues with resume=true.")
    return StorageError(f"cannot write {str(path)!r}: {e.strerror or e} ({code or type(e).__name__}).")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Raises :class:`StorageError` when the file cannot be written (full disk, quota, permissions).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise storage_error(path, e) from None
    os.close(fd)
    tmp = Path(tmp)
    failure = None
    try:
        yield tmp
        # mkstemp makes 0600, and a writer may recreate the file (safetensors does): every file a run leaves gets
        # the mode of a plain open() under this umask, as results, caches and weights are meant to be shared.
        os.chmod(tmp, FILE_MODE)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        failure = e
    finally:
        tmp.unlink(missing_ok=True)
    if failure is not None:  # built after the temporary file is gone: the free space it reports is the real one
        raise storage_error(path, failure) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def remove_orphan_temporaries(root: str | os.PathLike, *, any_host: bool = True) -> list[Path]:
    """Delete the temporary files under ``root`` whose writer is gone (killed mid-write); return them.

    A temporary file of a process that is still running on this host is always kept. ``any_host=True``
    also removes the temporaries of other hosts (whose liveness cannot be checked): only for a folder
    that this run owns, its run directory. For shared folders (a cache, other runs' directories) use
    ``any_host=False``, which removes only this host's temporaries whose process has ended.
    """
    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for tmp in root.rglob(".*.tmp"):
        m = _TEMPORARY.match(tmp.name)
        if m and m["host"] == _HOST and (int(m["pid"]) == os.getpid() or _alive(int(m["pid"]))):
            continue
        if not any_host and not (m and m["host"] == _HOST):
            continue
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted write: %s", len(removed),
                 ", ".join(str(p.relative_to(root)) for p in removed[:5]))
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
