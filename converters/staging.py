"""Output folders that appear whole or not at all.

Everything is written into a hidden folder beside the destination (same filesystem), which
is renamed into place only once complete; on any error it is removed. An existing
destination is replaced only at that last step.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(folder: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files; the published folder gets
    the permissions any other new file would, so other users and services can read it."""
    mask = _current_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def publish_folder(tmp: Path, dst: Path) -> None:
    """Move the finished temp folder into place, replacing an old `dst` only now."""
    _apply_umask(tmp)
    if not dst.exists():
        os.rename(tmp, dst)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
    os.rename(dst, old / "dst")
    try:
        os.rename(tmp, dst)
    except OSError:
        os.rename(old / "dst", dst)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_folder(dst: Path) -> Iterator[Path]:
    """Yield an empty folder to write into; publish it as `dst` if the block succeeds."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
        publish_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
