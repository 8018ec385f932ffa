"""Files written atomically, with the mode a plain ``open(path, "w")`` would give them.

Every file sdrt writes (pictures, previews, manifests, bench reports and plots) is written beside its target
and renamed into place, so a crash or a concurrent reader never sees half a file. The temporary file is
created with mode 0o666, so the kernel applies the umask as it does for ``open``; ``tempfile.mkstemp`` would
make it owner-only (0o600), and a web server or another user could not read the picture. A file that is
replaced keeps its own mode.
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty, uniquely named hidden file beside ``path`` (mode 0o666 less the umask), open for writing."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write; renamed onto ``path`` when the block succeeds,
    removed when it fails (an exception, Ctrl-C or SIGTERM through sdrt._signals)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        try:
            if path.exists():
                os.fchmod(fd, path.stat().st_mode & 0o7777)
        finally:
            os.close(fd)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text beside the target, sync it, and rename it into place."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
