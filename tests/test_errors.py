"""Clear errors through the CLI, each naming its fix, raised before any tokenizer or weights load; `python -m`
prints them in a few lines. Also the safe-loading rules."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_run import run_cli

from dsocr_lightning.cli import main
from dsocr_lightning.fast import FastPaths
from dsocr_lightning.training.checks import ConfigError, check_precision
from dsocr_lightning.training.module import DeepSeekOCRModule
from dsocr_lightning.training.plan import RunPlan
from dsocr_lightning.training.preimport import choose_backend

ROOT = Path(__file__).parents[1]


def fit_args(standin_dir, lines_dir, *extra: str, subcommand: str = "fit") -> list[str]:
    return [
        subcommand, "--config", str(ROOT / "configs/demo.yaml"),
        "--model.model_name_or_path", str(standin_dir), "--model.make_standin", "false",
        "--data.source", str(lines_dir), "--data.source_type", "imagefolder", "--data.num_workers", "0",
        "--trainer.enable_progress_bar", "false", *extra,
    ]  # fmt: skip


@pytest.fixture
def nothing_loads(monkeypatch):
    """Any tokenizer or model load fails the test: the error under test must come first."""
    from transformers import AutoModel, AutoTokenizer

    def refuse(*args, **kwargs):
        raise AssertionError("a tokenizer or model was loaded before the error")

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(AutoModel, "from_pretrained", refuse)


def other_model(tmp_path) -> str:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert"}))
    return str(tmp_path / "bert")


def bin_weights(tmp_path, standin_dir) -> str:
    copy = shutil.copytree(standin_dir, tmp_path / "ckpt")
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    return str(copy)


CASES = {  # name: (flags, made from (tmp_path, standin_dir) or None, what the message must say)
    "model folder as the README spells it": (["--model.model_name_or_path", "deepseek_ocr"],
                                            r"model folder 'deepseek_ocr' not found .*\n.*snapshot_download"),
    "model folder with ./": (["--model.model_name_or_path", "./deepseek_ocr"], "model folder './deepseek_ocr' not found"),
    "empty model folder": (["--model.model_name_or_path", "{tmp}"], "has no config.json"),
    "folder of another model": (["--model.model_name_or_path", "{other}"], "not a DeepSeek-OCR checkpoint"),
    "weights not in safetensors": (["--model.model_name_or_path", "{bin}"], "no .safetensors weights"),
    "hub model offline, not cached": (["--model.model_name_or_path", "nobody/nothing"], "not in the local Hugging Face"),
    "remote code not trusted": (["--model.trust_remote_code", "false"], "set trust_remote_code: true"),
    "adapter missing": (["--model.adapter_path", "lora_model"], "adapter 'lora_model' not found"),
    "data folder missing": (["--data.source", "./no_such_folder", "--data.source_type", "auto"],
                            "data source './no_such_folder' not found"),
    "split string": (["--data.train_split", "train[1000]"], "not of the form name or name"),
    "instruction without image": (["--data.instruction", "Free OCR."], "exactly one '<image>'"),
    "checkpoint file missing": (["--ckpt_path", "nothing.ckpt"], "no such checkpoint file"),
    "resume cadence on the best checkpoint": (["--checkpoint.every_n_train_steps", "2"],
                                              "use --last_checkpoint.every_n_train_steps"),
    "unsloth on several devices": (["--model.backend", "unsloth", "--trainer.devices", "2"],
                                   "Unsloth trains on one GPU here: for several use backend transformers"),
    "unsloth on several nodes": (["--model.backend", "unsloth", "--trainer.num_nodes", "2"], "one GPU here"),
    "4-bit weights on transformers": (["--model.backend", "transformers", "--model.load_in_4bit", "true"],
                                      "load_in_4bit trains on the Unsloth backend only"),
    "triton kernel without a GPU": (["--model.fast.grouped_experts", "triton"],
                                    "fast.grouped_experts triton: (Triton kernels need an NVIDIA GPU|Triton is not)"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_config_errors_come_before_anything_loads(case, standin_dir, lines_dir, tmp_path, nothing_loads, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as a user runs it: no interpreter for the Triton kernels
    flags, message = CASES[case]
    made = {"{tmp}": lambda: str(tmp_path), "{other}": lambda: other_model(tmp_path),
            "{bin}": lambda: bin_weights(tmp_path, standin_dir)}  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        main(fit_args(standin_dir, lines_dir, *[made[f]() if f in made else f for f in flags]))


@pytest.mark.parametrize(
    ("subcommand", "flags", "message"),
    [
        ("validate", ["--data.val_split", "null"], "set data.val_split to run `validate`"),
        ("test", [], "set data.test_split to run `test`"),
        ("predict", [], "set data.predict_inputs"),
        ("predict", ["--data.predict_inputs", "[scans/]"], "no image found for 'scans/'"),
    ],
)
def test_each_subcommand_has_what_it_needs(subcommand, flags, message, standin_dir, lines_dir, nothing_loads):
    with pytest.raises(ConfigError, match=message):
        main(fit_args(standin_dir, lines_dir, *flags, subcommand=subcommand))


@pytest.mark.parametrize(
    ("flags", "first_line", "fix"),
    [
        (["--model.model_name_or_path", "deepseek_ocr", "--model.make_standin", "false"],
         "error: model folder 'deepseek_ocr' not found", "snapshot_download"),
        (["--data.mode", "huge"], "tip: ", "Literal['tiny', 'small', 'base', 'large', 'gundam']. Got value: huge"),
        (["--model.loop.min_repeats", "0"], "error: loop.min_repeats (0)", "give each 1 or more"),
    ],
    ids=["missing model folder", "unknown mode", "loop rule"],
)  # fmt: skip
def test_python_m_says_what_to_fix_in_a_few_lines(flags, first_line, fix, tmp_path):
    done = run_cli(["fit", "--config", str(ROOT / "configs/demo.yaml"), *flags], tmp_path, timeout=120)
    output = [line for line in (done.stdout + done.stderr).splitlines() if line != "Seed set to 3407"]
    assert done.returncode != 0 and len(output) <= 5 and output[0].startswith(first_line), output
    assert fix in "\n".join(output) and "Traceback" not in done.stderr


def test_data_errors_found_on_reading_still_come_before_the_tokenizer(standin_dir, lines_dir, nothing_loads):
    with pytest.raises(ConfigError, match=r"could not load split 'validation' of .*(Unknown split|validation)"):
        main(fit_args(standin_dir, lines_dir, "--data.train_split", "validation"))
    with pytest.raises(ConfigError, match=r"could not load split 'train\[:1000\]' of 'nobody-here/no-such-dataset'"):
        main(fit_args(standin_dir, lines_dir, "--data.source", "nobody-here/no-such-dataset",
                      "--data.source_type", "auto", "--data.train_split", "train[:1000]"))  # fmt: skip


def test_unsloth_without_a_gpu():
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        choose_backend("unsloth", False, False, "native", cuda=False, unsloth=True)
    assert choose_backend("auto", False, False, "native", cuda=False, unsloth=True)[0] == "transformers"


def test_auto_never_picks_unsloth_for_several_devices():
    """Unsloth has no data-parallel path here (it fails in DDP's reducer, also under a DDP strategy on one GPU): auto
    takes transformers + peft under DDP even where Unsloth is there and would be chosen on one device."""
    assert choose_backend("auto", False, False, "loop", cuda=True, unsloth=True)[0] == "unsloth"
    assert choose_backend("auto", False, True, "loop", cuda=True, unsloth=True)[0] == "transformers"


def test_4bit_weights_decide_the_backend():
    """`auto` with load_in_4bit takes Unsloth (the backend that has it) where it can run; elsewhere it is refused
    (the CLI's one-line errors: CASES)."""
    assert choose_backend("auto", True, False, "native", cuda=True, unsloth=True) == (
        "unsloth",
        "load_in_4bit: 4-bit base weights train on Unsloth only",
    )
    with pytest.raises(ValueError, match="backend unsloth .*Unsloth is not installed"):
        choose_backend("auto", True, False, "native", cuda=True, unsloth=False)


def test_a_ddp_strategy_on_one_device_is_data_parallel(standin_dir, lines_dir):
    cli = main(fit_args(standin_dir, lines_dir, "--trainer.strategy", "ddp", "--trainer.devices", "1")[1:], run=False)
    cli.model.trainer = cli.trainer
    assert cli.trainer.world_size == 1 and cli.model.data_parallel
    cli = main(fit_args(standin_dir, lines_dir)[1:], run=False)
    cli.model.trainer = cli.trainer
    assert not cli.model.data_parallel


def test_plain_ddp_with_the_per_expert_loop_says_which_strategy(standin_dir, lines_dir):
    """With grouped experts off, transformers' per-expert loop gives an idle expert no gradient: plain DDP is
    refused at the start of fit with the strategy to use (DDP itself would fail a step later, at length)."""
    from torch.nn.parallel import DistributedDataParallel

    from dsocr_lightning.training.module import check_data_parallel

    cli = main(fit_args(standin_dir, lines_dir, "--model.fast.grouped_experts", "loop")[1:], run=False)
    cli.model.trainer = cli.trainer
    cli.model.configure_model()
    wrapper = DistributedDataParallel.__new__(DistributedDataParallel)
    wrapper.find_unused_parameters = False
    with pytest.raises(ConfigError, match=r"\d+ MoE layers run transformers' per-expert loop.*ddp_find_unused_param"):
        check_data_parallel(wrapper, cli.model.model)
    wrapper.find_unused_parameters = True
    check_data_parallel(wrapper, cli.model.model)
    cli.model.model = None  # grouped experts (the default here): every expert weight gets a gradient, plain DDP runs
    cli.model.load_settings.fast = FastPaths()
    cli.model.plan = RunPlan()  # decided again when the model loads (the CLI's plan said loop)
    cli.model.configure_model()
    wrapper.find_unused_parameters = False
    check_data_parallel(wrapper, cli.model.model)


def test_bf16_on_a_gpu_without_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ValueError, match="Tesla T4 has no bf16: use --trainer.precision 16-mixed"):
        check_precision("bf16-mixed")
    check_precision("16-mixed")


def test_out_of_memory_names_the_remedies():
    module = DeepSeekOCRModule()

    def runs_out(**kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    module.model, module.version = runs_out, "v1"  # (a hand-built module: nothing loaded, no plan)
    batch = {k: None for k in ("input_ids", "attention_mask", "labels", "images", "images_seq_mask")}
    batch |= {"images_spatial_crop": None, "texts": ["a", "b"]}
    with pytest.raises(RuntimeError, match=r"--data.batch_size, currently 2.*gradient_checkpointing.*--data.mode"):
        module.guarded_forward(batch)


def test_more_gpus_than_the_machine_has(monkeypatch):
    from dsocr_lightning.training.checks import check_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"trainer.devices 2: this machine has 1 CUDA GPU\(s\): --trainer.devices 1"):
        check_accelerator({"accelerator": "gpu", "devices": 2, "precision": "bf16-mixed"})
    check_accelerator({"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed"})
