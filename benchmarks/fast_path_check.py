"""The fast paths on the real architecture (random weights): same loss, LoRA gradients and greedy tokens as the model's
own code, in float32 on the GPU; and which dtypes `torch._grouped_mm` runs here.

python benchmarks/fast_path_check.py MODEL_DIR LINES_DIR [--lines 4] [--compiled]
                                     [--json benchmarks/results/fast_path_check.json]

One model in float32 with a LoRA adapter whose B matrices are random (so the adapter matters): the loss, every LoRA
gradient and 16 greedy tokens per line with transformers' expert loop and per-sample vision; then the same after
patching grouped experts, then batched vision on top. Relative differences are |a - b| / |b| over each tensor.
`--compiled`: also, in bf16 autocast with the fast paths, the loss and LoRA gradients of the decoder layers compiled
(fast/compiled_layers.py, inductor, rounding every op to bf16 as eager does: `emulate_precision_casts`) against the
same layers eager, each also against the model in float32.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import commit, write_json
from lightning.fabric.utilities.apply_func import move_data_to_device

from dsocr_lightning.data.datamodule import OCRDataModule
from dsocr_lightning.families import family
from dsocr_lightning.fast import FastPaths
from dsocr_lightning.fast.compiled_layers import compile_layers
from dsocr_lightning.fast.grouped_mm import grouped_mm, grouped_mm_reference
from dsocr_lightning.fast.moe import patch_grouped_experts
from dsocr_lightning.fast.vision import patch_batched_vision
from dsocr_lightning.training.generation import GenerationSettings, generate_tokens
from dsocr_lightning.training.loading import LoadSettings, LoraSettings, load_model

MODEL_KEYS = family("v1").forward_keys

CUDA = torch.cuda.is_available()  # else a CPU dry run (e.g. on the test stand-in: `--compiled` there takes minutes)
DEVICE = "cuda" if CUDA else "cpu"


def lora_grads(model) -> dict[str, torch.Tensor]:
    """Every LoRA gradient by PEFT name (grouped experts' from their stacked parameters)."""
    named, grads = dict(model.named_parameters()), {}
    for name, param in named.items():
        if "lora_" not in name:
            continue
        if ".experts." in name and not param.requires_grad:
            prefix, rest = name.split(".experts.")
            expert, proj = rest.split(".")[:2]
            param = named[f"{prefix}.stacked_{proj}_{'A' if '.lora_A.' in name else 'B'}"]
            grads[name] = param.grad[int(expert)].clone()
        else:
            grads[name] = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
    return grads


def measure(model, tokenizer, batch) -> dict:
    """Loss and LoRA gradients in float32, then 16 greedy tokens per line."""
    result = train_measure(model, batch, bf16=False)
    model.eval()
    tokens = generate_tokens(model, tokenizer, batch, GenerationSettings(max_new_tokens=16))
    return result | {"tokens": tokens.cpu()}


def train_measure(model, batch, bf16: bool = True) -> dict:
    """Loss and LoRA gradients of one training forward/backward (in bf16 autocast unless `bf16` is False)."""
    model.zero_grad(set_to_none=True)
    model.train()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**{k: batch[k] for k in MODEL_KEYS}, use_cache=False).loss
    loss.backward()
    return {"loss": loss.item(), "grads": lora_grads(model)}


def compiled_check(args: argparse.Namespace, batch: dict) -> dict:
    """Eager and compiled layers in bf16 autocast, each against the same model run in float32 (its bf16 weights
    upcast, eager): which one rounds further from the exact gradients."""
    fast = FastPaths(compile_layers=False)  # compiled below, after the eager runs
    settings = LoadSettings(args.model_dir, "transformers", True, dtype="bfloat16", fast=fast)
    model, *_ = load_model(settings, LoraSettings(), device=torch.device(DEVICE), compute_dtype=torch.bfloat16)
    random_lora_b(model)
    model = model.to(DEVICE)
    views = lambda dtype: dict(batch, images=[(c.to(dtype), g.to(dtype)) for c, g in batch["images"]])
    runs = {"eager": train_measure(model, views(torch.bfloat16))}
    runs["eager_again"] = train_measure(model, views(torch.bfloat16))
    compile_layers(model)
    runs["compiled"] = train_measure(model, views(torch.bfloat16))
    with torch.compiler.set_stance("force_eager"):
        truth = train_measure(model.float(), views(torch.float32), bf16=False)
    pick = lambda d: {k: v for k, v in d.items() if k != "same_greedy_lines"}
    return {"float32_loss": truth["loss"]} | {
        f"{name}_vs_{ref}": pick(compare(run, runs["eager"] if ref == "eager" else truth, tokens=False))
        for name, run in runs.items() for ref in ("eager", "float32") if name != ref
    }  # fmt: skip


def random_lora_b(model) -> None:
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name or name.endswith("_B"):
            param.data.normal_(0, 0.01)


def compare(got: dict, expected: dict, tokens: bool = True) -> dict:
    worst = max(((got["grads"][n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in expected["grads"].items()
                if g.norm() > 0)  # fmt: skip
    same = (got["tokens"] == expected["tokens"]).all(dim=1).float().mean().item() if tokens else None
    flat = lambda grads: torch.cat([grads[n].float().flatten() for n in expected["grads"]])
    overall = ((flat(got["grads"]) - flat(expected["grads"])).norm() / flat(expected["grads"]).norm()).item()
    return {"loss": got["loss"], "loss_rel_diff": abs(got["loss"] - expected["loss"]) / abs(expected["loss"]),
            "worst_lora_grad_rel_diff": worst, "all_lora_grads_rel_diff": overall, "same_greedy_lines": same}  # fmt: skip


def grouped_mm_support() -> dict:
    """Which dtypes run, and how far each is from one matmul per expert (uneven groups, an empty one)."""
    out = {}
    offs = torch.tensor([100, 100, 356, 357, 512], dtype=torch.int32, device="cuda")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, w = torch.randn(512, 1280, device="cuda", dtype=dtype), torch.randn(5, 896, 1280, device="cuda", dtype=dtype)
        try:
            got, ref = grouped_mm(x, w, offs).float(), grouped_mm_reference(x.float(), w.float(), offs)
            out[str(dtype)] = f"ok, rel diff {((got - ref).norm() / ref.norm()).item():.2e}"
        except Exception as error:  # noqa: BLE001  (reporting what this torch build refuses)
            out[str(dtype)] = f"refused: {type(error).__name__}: {str(error)[:120]}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("lines_dir")
    parser.add_argument("--lines", type=int, default=4)
    parser.add_argument("--compiled", action="store_true", help="also compiled vs eager decoder layers, bf16")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/fast_path_check.json"))
    args = parser.parse_args()
    off = FastPaths(grouped_experts="loop", batched_vision=False)
    settings = LoadSettings(args.model_dir, "transformers", True, dtype="float32", fast=off)
    model, tokenizer, *_ = load_model(settings, LoraSettings(), device=torch.device(DEVICE))
    random_lora_b(model)
    model = model.to(DEVICE)
    data = OCRDataModule(args.lines_dir, "imagefolder", "train", None, image_column="image",
                         tokenizer_name_or_path=args.model_dir, trust_remote_code=True)  # fmt: skip
    data.setup("fit")
    batch = data.collator(True)([data.datasets["train"][i] for i in range(args.lines)])
    batch = move_data_to_device(batch, DEVICE)
    reference = measure(model, tokenizer, batch)
    patch_grouped_experts(model)
    grouped = measure(model, tokenizer, batch)
    patch_batched_vision(model)
    batched = measure(model, tokenizer, batch)
    result = {
        "device": torch.cuda.get_device_name() if CUDA else "cpu (dry run)", "commit": commit(), "dtype": "float32",
        "lines": args.lines,
        "reference_loss": reference["loss"], "grouped_experts": compare(grouped, reference),
        "grouped_experts_and_batched_vision": compare(batched, reference),
        "grouped_mm": grouped_mm_support() if CUDA else None,
    }  # fmt: skip
    write_json(args.json, result)
    if args.compiled:
        del model
        torch.cuda.empty_cache() if CUDA else None
        result["compiled_layers_bf16"] = compiled_check(args, batch)
        write_json(args.json, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
