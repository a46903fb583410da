"""Running `python -m dsocr_lightning` as a user does, and checking that a refused command changed nothing.

`run_cli` runs it in a folder and returns the exit code and its output: as a fork of a warm process that has imported
torch, lightning and transformers already (`Zygote`: the same `python -m dsocr_lightning` code path, ~4 s of imports
less a command), or as a fresh process where the test sets environment variables (libraries read some of them when
imported); `error_line` is the one `error:` line the command ended with; `snapshot` hashes every file under some folders, so that a test can assert that everything that
existed before a refused command still exists, byte for byte, and that nothing was added.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
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
    if not env:
        return Zygote.get().run(args, cwd, timeout)
    environment = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    done = subprocess.run([sys.executable, "-m", "dsocr_lightning", *args], cwd=cwd, env=environment, check=False,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return Done(done.returncode, done.stdout, done.stderr)


# The zygote: reads one JSON request a line, forks, and the child runs `python -m dsocr_lightning` as the
# interpreter would (argv, working folder, output to files, the exit code of SystemExit or 1 after a traceback, atexit
# handlers); the zygote answers the child's exit code. Nothing in it has run a torch op before forking (no threads).
ZYGOTE = r"""
import atexit, json, os, runpy, signal, sys, time, traceback
import torch, lightning.pytorch, transformers, torchmetrics  # the start-up every command pays
sys.stdout.flush()
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(job["cwd"])
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv, sys.path[0], code = ["-m", *job["args"]], job["cwd"], 0
        try:
            runpy.run_module("dsocr_lightning", run_name="__main__", alter_sys=True)
        except SystemExit as error:
            code = error.code if isinstance(error.code, int) else 0 if error.code is None else 1
            if not isinstance(error.code, int) and error.code is not None:
                print(error.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(code)
    deadline = time.monotonic() + job["timeout"]
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print(json.dumps({"timeout": True}), flush=True)
    else:
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(done[1])}), flush=True)
"""


class Zygote:
    """One warm process per test worker, started on first use; it ends when the worker does (its stdin closes)."""

    running: Zygote | None = None

    def __init__(self) -> None:
        self.environment = dict(os.environ, PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=self.environment, cwd=ROOT, text=True)  # fmt: skip

    @classmethod
    def get(cls) -> Zygote:
        """The running one, or a new one where it died or the test process's environment changed since it started
        (libraries read some variables when imported: a fork would keep their old values)."""
        running = cls.running
        if (
            running is None
            or running.process.poll() is not None
            or running.environment != dict(os.environ, PYTHONPATH=str(ROOT))
        ):
            if running is not None:
                running.process.kill()
            cls.running = cls()
        return cls.running

    def run(self, args: list[str], cwd: Path, timeout: int) -> Done:
        with tempfile.TemporaryDirectory() as folder:
            out, err = Path(folder, "stdout"), Path(folder, "stderr")
            job = {"args": args, "cwd": str(cwd), "stdout": str(out), "stderr": str(err), "timeout": timeout}
            self.process.stdin.write(json.dumps(job) + "\n")
            self.process.stdin.flush()
            answer = json.loads(self.process.stdout.readline())
            if answer.get("timeout"):
                raise subprocess.TimeoutExpired(["python", "-m", "dsocr_lightning", *args], timeout)
            return Done(answer["returncode"], out.read_text(), err.read_text())


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
