"""Output folders (adapters, merged exports) written beside their target and swapped in whole, never half a folder,
with the permissions the user's umask gives (not `tempfile.mkdtemp`'s 0700, nor safetensors' 0600 files).

A folder is replaced only when everything in it is this tool's own earlier output of the same kind: each one carries
a manifest (`MANIFEST`) listing what was written, and a file or folder it does not list (a user's `results.csv`, a
subfolder, a checkpoint) makes the folder someone else's, which is never removed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from ..training.checks import ConfigError

MANIFEST = "dsocr_lightning.json"  # {"kind": "adapter" | "export", "entries": [relative paths]}
OutputKind = Literal["adapter", "export"]


class ForeignFilesError(ConfigError):
    """A folder to be replaced holds entries this tool did not write there."""


def entries(folder: Path) -> list[str]:
    """Every file and subfolder under `folder`, as sorted paths relative to it (folders end in `/`)."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        found += [f"{(base / name).as_posix()}/" for name in dirs] + [(base / name).as_posix() for name in files]
    return sorted(found)


def owned_entries(folder: Path, kind: OutputKind) -> set[str]:
    """What this tool's manifest in `folder` says it wrote there as `kind` (nothing without a readable manifest)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(manifest, dict) or manifest.get("kind") != kind:
        return set()
    return {*manifest.get("entries", []), MANIFEST}


def foreign_entries(folder: Path, kind: OutputKind) -> list[str]:
    """Entries of `folder` that are not this tool's `kind` output (all of them when it has no such manifest); [] for
    a folder that is missing or empty."""
    if not folder.is_dir():
        return []
    owned = owned_entries(folder, kind)
    return [entry for entry in entries(folder) if entry not in owned]


def describe(found: list[str], show: int = 3) -> str:
    more = f", ... ({len(found)} in all)" if len(found) > show else ""
    return ", ".join(found[:show]) + more


def check_replaceable(target: Path, kind: OutputKind, what: str) -> None:
    """`target` may be written: missing, empty, or this tool's own earlier `kind` output; else `ForeignFilesError`."""
    if target.exists() and not target.is_dir():
        raise ForeignFilesError(f"{what} {str(target)!r} is a file, not a folder: give a folder path")
    foreign = foreign_entries(target, kind)
    if foreign:
        raise ForeignFilesError(
            f"{what} {str(target)!r} holds files this tool did not write there ({describe(foreign)}); nothing in it "
            "is replaced: give a new or empty folder"
        )


def write_manifest(folder: Path, kind: OutputKind) -> None:
    listed = entries(folder)
    (folder / MANIFEST).write_text(json.dumps({"kind": kind, "entries": listed}, indent=1) + "\n")


@contextmanager
def replaced_folder(target: str | Path, kind: OutputKind, what: str = "output folder") -> Iterator[Path]:
    """Yields an empty folder beside `target` to write into; on success it replaces `target` (readable as any new
    folder would be), on any error it is removed and `target` stays as it was. A `target` holding anything but this
    tool's own `kind` output is refused before and (should something have been added meanwhile) after the writing."""
    target = Path(target)
    check_replaceable(target, kind, what)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}-{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()  # mode 0o777 minus the umask, as any folder the user makes
    try:
        yield tmp
        write_manifest(tmp, kind)
        match_folder_mode(tmp)
        check_replaceable(target, kind, what)
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
    """Replace `target` (checked to be this tool's own output, or empty) by `tmp`; the old one is moved aside first and
    removed after."""
    old = target.with_name(f".{target.name}-{uuid.uuid4().hex[:8]}.old")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def within(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (both resolved)."""
    path, folder = path.expanduser().resolve(), folder.expanduser().resolve()
    return path == folder or folder in path.parents


def writable_parent(path: Path) -> Path | None:
    """The nearest existing folder at or above `path` (what must let a new entry be made), None if a file is in the
    way."""
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate if candidate.is_dir() else None
    return None


def check_writable_location(path: Path, what: str) -> None:
    """`path` (a file or folder to be created or replaced) can be made there: no file stands in the way of its
    folders, and the nearest existing folder above it is writable (a read-only folder or file system fails now, not
    after the work)."""
    parent = writable_parent(path.expanduser().absolute().parent)
    if parent is None:
        raise ConfigError(f"{what} {str(path)!r} cannot be made: a file stands where a folder of its path should be")
    for folder in [parent] + ([path] if path.is_dir() else []):  # a folder replaced: its old entries go too
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {str(path)!r} cannot be written: {str(folder)!r} is read-only; give a "
                              "writable location")  # fmt: skip
