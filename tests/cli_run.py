"""Running `python -m dsocr_lightning` as a user does, and checking that a refused command changed nothing.

`run_cli` runs it in a folder and returns the exit code and its output; `error_line` is the one `error:` line the
command ended with; `snapshot` hashes every file under some folders, so that a test can assert that everything that
existed before a refused command still exists, byte for byte, and that nothing was added.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "configs/demo.yaml"


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 300) -> Done:
    environment = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    done = subprocess.run([sys.executable, "-m", "dsocr_lightning", *args], cwd=cwd, env=environment, check=False,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return Done(done.returncode, done.stdout, done.stderr)


def error_line(done: Done) -> str:
    """The `error:` line a refused command ends with: exit code 1, its last line, the only one, no traceback."""
    lines = done.stderr.rstrip("\n").splitlines()
    assert done.returncode == 1, done.output[-3000:]
    assert "Traceback" not in done.output, done.output[-3000:]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], done.output[-3000:]
    return lines[-1]


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (folders as entries of their own), by path."""
    found = {}
    for root in roots:
        for path in sorted(Path(root).rglob("*")):
            found[str(path)] = "folder" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def demo_args(standin_dir: Path, lines_dir: Path, *extra: str, subcommand: str = "fit") -> list[str]:
    """The demo config on the test stand-in and lines: 16 training lines, 4 steps of 2 micro-batches of 2."""
    return [
        subcommand, "--config", str(DEMO), "--model.model_name_or_path", str(standin_dir),
        "--model.make_standin", "false", "--data.source", str(lines_dir), "--data.source_type", "imagefolder",
        "--data.num_workers", "0", "--data.batch_size", "2", "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "4", "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` unwritable, even to root (tests run as root on this project's machines: `chattr +i`, the immutable
    flag); for any other user its mode. Undone after."""
    folder.mkdir(parents=True, exist_ok=True)
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            import pytest

            pytest.skip("no way to make a read-only folder here")
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)
