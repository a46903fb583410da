"""Build the random-weight, full-size DeepSeek-OCR checkpoint the GPU benchmarks train (no weights download here).

python benchmarks/build_random_checkpoint.py REMOTE_CODE_DIR OUT_DIR [--seed 0] [--dtype bfloat16]

REMOTE_CODE_DIR is a folder holding the public model code and config of the real checkpoint (`config.json`,
`modeling_deepseekocr.py`, `deepencoder.py`, ...: the `unsloth/DeepSeek-OCR` files, which you fetch yourself; see
`../shared/docs/deepseek-ocr-contract.md` for public copies). Nothing of it is part of this project. The script
copies that code and config into OUT_DIR (leaving out debugger imports that public copies carry), instantiates the
architecture with seeded random weights on the GPU when there is one, saves it as safetensors, and adds the
package's character-level stand-in tokenizer (the real special-token ids, not the real vocabulary). Speed and
memory do not depend on the weight values; losses are those of a random model. Needs what the remote code imports
(`pip install -e ".[unsloth]"` brings it).
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

CODE_AND_CONFIG = ("*.py", "config.json", "processor_config.json")
DEBUGGER_LINE = re.compile(r"^\s*(import ipdb|st = ipdb\.set_trace)\s*$")


def copy_remote_code(source: Path, out: Path) -> None:
    """The model code and config, minus lines importing a debugger (not installed, never called)."""
    out.mkdir(parents=True, exist_ok=True)
    for pattern in CODE_AND_CONFIG:
        for path in source.glob(pattern):
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".py":
                text = "\n".join(line for line in text.splitlines() if not DEBUGGER_LINE.match(line)) + "\n"
            (out / path.name).write_text(text, encoding="utf-8")


def build(out: Path, seed: int, dtype: torch.dtype) -> int:
    """Random weights for the architecture in `out`'s config, saved there; returns the parameter count."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModel.from_config(config, trust_remote_code=True, torch_dtype=dtype)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="20GB")  # one file, as the real one
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("remote_code_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    if (args.out_dir / "model.safetensors").exists():
        print(f"{args.out_dir} already holds a checkpoint: kept")
        return
    from dsocr_lightning.families.v1.standin import write_tokenizer

    start = time.perf_counter()
    copy_remote_code(args.remote_code_dir, args.out_dir)
    count = build(args.out_dir, args.seed, getattr(torch, args.dtype))
    write_tokenizer(args.out_dir)
    print(f"random {args.dtype} checkpoint, {count:,} parameters, written to {args.out_dir} "
          f"in {time.perf_counter() - start:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
