"""Output folders (adapters, merged exports) written beside their target and swapped in whole, never half a folder,
with the permissions the user's umask gives (not `tempfile.mkdtemp`'s 0700, nor safetensors' 0600 files)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_folder(target: str | Path) -> Iterator[Path]:
    """Yields an empty folder beside `target` to write into; on success it replaces `target` (readable as any new
    folder would be), on any error it is removed and `target` stays as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()  # mode 0o777 minus the umask, as any folder the user makes
    try:
        yield tmp
        match_folder_mode(tmp)
        swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def match_folder_mode(folder: Path) -> None:
    """Give every file under `folder` the folder's own umask-derived mode, without execute bits (some writers,
    safetensors among them, create 0600 files)."""
    folder_mode = folder.stat().st_mode & 0o777
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), folder_mode)
        for name in files:
            os.chmod(os.path.join(root, name), folder_mode & 0o666)


def swap_in(tmp: Path, target: Path) -> None:
    """Replace `target` by `tmp`; the old folder is moved aside first and removed after."""
    old = target.with_name(f".{target.name}-old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
