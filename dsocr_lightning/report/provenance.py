"""Which code wrote a report: the git commit of the package's checkout (and whether it had uncommitted changes)."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def git(*args: str) -> str | None:
    """A git command's output in the package's folder; None where git or a checkout is missing."""
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True, timeout=10,
                              check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def code_commit() -> str:
    """`<commit>` or `<commit> + uncommitted changes`; or the installed version when the package is no checkout."""
    commit = git("rev-parse", "--short=12", "HEAD")
    if commit is None:
        try:
            return f"unknown (dsocr_lightning {version('dsocr_lightning')}, not a git checkout)"
        except PackageNotFoundError:
            return "unknown (not a git checkout)"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", str(PACKAGE_DIR))
    return f"{commit} + uncommitted changes" if changed else commit
