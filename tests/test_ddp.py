"""Data-parallel fit on CPU (2 processes, gloo) on the tiny stand-in, through `python -m dsocr_lightning` as a user runs
it: the same adapter as one process with the same global batch, on 2 devices or on 2 "nodes" of one host; validation
counting each of an odd number of lines once (predictions with known CERs, see fake_generation.py) without metric
warnings; kill -9 then `--ckpt_path last` resuming exactly; a rank whose whole step is NaN skipping it without a hang;
only rank 0 writing logs, checkpoints and the adapter."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fake_generation import dropped_chars, expected_cers
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).parents[1]
STEPS = 4  # optimizer steps of global batch 4 (batch 1 x accumulation 4/processes x processes)


@pytest.fixture(scope="module")
def odd_lines(tmp_path_factory):
    """5 validation lines: 2 ranks get 3 and 2, so a padding sampler would count one line twice."""
    from dsocr_lightning.data.render import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("odd") / "data", {"train": 16, "test": 5}, seed=1)


def fit_args(standin_dir, lines_dir, save_dir, processes: int, *extra: str) -> list[str]:
    """The demo config, validation once at the end, checkpoints every 2 steps."""
    return [
        "fit", "--config", str(ROOT / "configs/demo.yaml"),
        "--model.model_name_or_path", str(standin_dir), "--model.make_standin", "false",
        "--model.optimizer", "adamw", "--model.generation.max_new_tokens", "6",
        "--data.source", str(lines_dir), "--data.source_type", "imagefolder",
        "--data.batch_size", "1", "--data.eval_batch_size", "1", "--data.num_workers", "0",
        "--trainer.accumulate_grad_batches", str(4 // processes), "--trainer.max_steps", str(STEPS),
        "--trainer.val_check_interval", str(4 * STEPS // processes), "--last_checkpoint.every_n_train_steps", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(save_dir), *extra,
    ]  # fmt: skip


def launch(args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
    """`python -m dsocr_lightning` (with the fake decoding) in its own process group: DDP's extra ranks included."""
    cwd.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    return subprocess.Popen([sys.executable, str(ROOT / "tests/fake_generation.py"), *args], cwd=cwd, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


def finish(children: list[subprocess.Popen], log: Path) -> str:
    for child in children:
        try:
            child.wait(timeout=240)
        except subprocess.TimeoutExpired:  # a hung collective: do not leave the processes behind
            os.killpg(child.pid, signal.SIGKILL)
            raise
    text = log.read_text()
    assert all(child.returncode == 0 for child in children), text[-3000:]
    return text


def fit(standin_dir, lines_dir, save_dir: Path, processes: int, *extra: str, **env: str) -> str:
    log = save_dir / "fit.log"
    return finish([launch(fit_args(standin_dir, lines_dir, save_dir, processes, *extra), save_dir, log, **env)], log)


def ddp(*extra: str) -> list[str]:
    # plain DDP: the grouped experts (on by default, native on the CPU) give every expert weight a gradient
    return ["--trainer.devices", "2", "--trainer.strategy", "ddp", *extra]


def scalars(save_dir: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(save_dir / "lightning_logs/version_0"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def final(save_dir: Path, tag: str) -> float:
    values = scalars(save_dir, tag)
    return values[max(values)]


def adapter(save_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(save_dir / "lightning_logs/version_0/lora_model/adapter_model.safetensors")


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tolerance: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < tolerance
    assert max(b[k].abs().max().item() for k in b if "lora_B" in k) > 0  # trained, not the zero init


@pytest.fixture(scope="module")
def one(standin_dir, odd_lines, tmp_path_factory) -> Path:
    save_dir = tmp_path_factory.mktemp("one")
    fit(standin_dir, odd_lines, save_dir, 1)
    return save_dir


@pytest.fixture(scope="module")
def two(standin_dir, odd_lines, tmp_path_factory) -> tuple[Path, str]:
    save_dir = tmp_path_factory.mktemp("two")
    return save_dir, fit(standin_dir, odd_lines, save_dir, 2, *ddp())


def expected(lines_dir: Path, save_dir: Path) -> tuple[float, float]:
    """(corpus, mean) CER of the fake decoding on the validation lines with the weights of the run's adapter."""
    references = [json.loads(line)["text"] for line in (lines_dir / "test/metadata.jsonl").open()]
    return expected_cers(references, dropped_chars(adapter(save_dir).items()))


def test_two_processes_match_one(one, two, odd_lines):
    two, log = two
    assert sorted(p.name for p in (two / "lightning_logs").iterdir()) == ["version_0"]  # rank 0 only
    assert_same_adapter(adapter(one), adapter(two))
    corpus, mean = expected(odd_lines, one)
    for run in (one, two):  # every line once: a duplicated line would move both figures
        cer, cer_mean = final(run, "val/cer"), final(run, "val/cer_mean")
        assert (cer, cer_mean) == pytest.approx((corpus, mean), abs=1e-6)
    assert final(one, "val/loss") == pytest.approx(final(two, "val/loss"), abs=1e-5)
    assert scalars(one, "train/loss") == pytest.approx(scalars(two, "train/loss"), abs=1e-5)
    assert "sync_dist" not in log and "Traceback" not in log, log
    assert sorted(p.name for p in (two / "lightning_logs/version_0/checkpoints").iterdir()) == sorted(
        p.name for p in (one / "lightning_logs/version_0/checkpoints").iterdir()
    )


def report_rows(save_dir: Path) -> tuple[list[int], list[str]]:
    """The line indices the run's report lists and its summary's metric rows."""
    (page,) = save_dir.rglob("report.html")  # one report: rank 0's
    html = page.read_text(encoding="utf-8")
    lines = [int(i) for i in re.findall(r'<tr class="line" id="line-(\d+)">', html)]
    return lines, re.findall(r"<tr><td>.*?</tr>", html.split('class="metrics"')[1].split("</table>")[0])


def test_two_processes_report_every_line_once(one, two):
    two, _ = two
    lines, metrics = report_rows(one)
    assert sorted(lines) == list(range(5)) and (lines, metrics) == report_rows(two)  # each rank's lines, gathered
    for tag in ("val/wer", "val/exact_lines", "val/loop_rate", "val/length_ratio"):
        assert final(one, tag) == pytest.approx(final(two, tag), abs=1e-6)
    events = EventAccumulator(str(two / "lightning_logs/version_0"), size_guidance={"histograms": 0})
    events.Reload()
    assert [h.histogram_value.num for h in events.Histograms("val/cer_lines")] == [5]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_nodes_of_one_process_match_one(one, standin_dir, odd_lines, tmp_path):
    """What a cluster launcher does: the same command on each node, with the node's rank and the master's address
    in the environment (Lightning's own variables: NODE_RANK, MASTER_ADDR, MASTER_PORT)."""
    args = fit_args(standin_dir, odd_lines, tmp_path, 2, "--trainer.num_nodes", "2", *ddp())
    args[args.index("--trainer.devices") + 1] = "1"  # one process per "node"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = [launch(args, tmp_path, logs[rank], NODE_RANK=str(rank), **env) for rank in (0, 1)]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in finish(nodes[1:], logs[1])
    finish(nodes[:1], logs[0])
    assert_same_adapter(adapter(one), adapter(tmp_path))
    assert final(one, "val/cer") == pytest.approx(final(tmp_path, "val/cer"), abs=1e-6)


def last_step(checkpoint: Path) -> int:
    try:
        return torch.load(checkpoint, weights_only=True)["global_step"]
    except (OSError, RuntimeError, EOFError):  # not written yet
        return -1


def test_kill_9_on_two_processes_resumes_exactly(two, standin_dir, odd_lines, tmp_path):
    two, _ = two
    args = fit_args(standin_dir, odd_lines, tmp_path, 2, *ddp())
    checkpoint = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    child, deadline = launch(args, tmp_path, tmp_path / "killed.log"), time.time() + 180
    while last_step(checkpoint) < 2 and child.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(child.pid, signal.SIGKILL)  # both ranks, at once
    child.wait()
    assert last_step(checkpoint) == 2, (tmp_path / "killed.log").read_text()[-3000:]

    fit(standin_dir, odd_lines, tmp_path, 2, *ddp("--ckpt_path", "last"))
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]  # resumed in place
    assert scalars(tmp_path, "train/loss") == pytest.approx(scalars(two, "train/loss"), abs=1e-6)
    assert_same_adapter(adapter(two), adapter(tmp_path), tolerance=1e-6)


def test_a_rank_skipping_a_whole_step_neither_hangs_nor_desyncs(standin_dir, odd_lines, tmp_path):
    """Rank 1's two micro-batches of step 1 are NaN: it joins the step's gradient all-reduces with zero gradients,
    the step averages rank 0's gradients with them, and both ranks carry on with the same weights."""
    log = fit(standin_dir, odd_lines, tmp_path, 2, *ddp("--model.nonfinite_loss", "skip"), FAKE_NONFINITE="1:1")
    assert log.count("on rank 1: skipping this micro-batch") == 2, log[-3000:]
    assert scalars(tmp_path, "train/nonfinite_skipped") == {0: 0.0, 1: 2.0, 2: 0.0, 3: 0.0}
    losses = scalars(tmp_path, "train/loss")
    assert sorted(losses) == list(range(STEPS)) and all(map(torch.isfinite, torch.tensor(list(losses.values()))))
    # rank 1 decoded with its own weights: had they drifted from rank 0's, the gathered CER would (likely) differ
    assert final(tmp_path, "val/cer") == pytest.approx(expected(odd_lines, tmp_path)[0], abs=1e-6)
    assert "Traceback" not in log
