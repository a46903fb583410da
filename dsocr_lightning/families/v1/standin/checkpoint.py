"""Write the tiny TEST STAND-IN checkpoint folder (random weights, NOT DeepSeek-OCR) that loads like the real one."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from transformers import GenerationConfig

from ...standin_tokenizer import IMAGE_TOKEN_ID, write_tokenizer
from .modeling_dsocr_standin import StandinOCRConfig, StandinOCRForCausalLM

log = logging.getLogger(__name__)

MODELING_FILE = Path(__file__).with_name("modeling_dsocr_standin.py")
AUTO_MAP = {
    "AutoConfig": "modeling_dsocr_standin.StandinOCRConfig",
    "AutoModel": "modeling_dsocr_standin.StandinOCRForCausalLM",
    "AutoModelForCausalLM": "modeling_dsocr_standin.StandinOCRForCausalLM",
}
README = "# TEST STAND-IN, random weights, not DeepSeek-OCR\n\nWritten by dsocr_lightning.families.v1.standin for offline tests.\n"


def standin_config(
    *, hidden_size: int, num_layers: int, num_heads: int, n_routed_experts: int, num_experts_per_tok: int,
    n_shared_experts: int, moe_intermediate_size: int, intermediate_size: int, vocab_size: int,
    initializer_range: float = 0.02, labelled_logits_only: bool = False,
) -> StandinOCRConfig:  # fmt: skip
    """DeepSeek-OCR-shaped config (dense layer 0, greedy MoE after it, no MLA) at the given tiny sizes."""
    config = StandinOCRConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        n_routed_experts=n_routed_experts, num_experts_per_tok=num_experts_per_tok,
        n_shared_experts=n_shared_experts, moe_intermediate_size=moe_intermediate_size,
        first_k_dense_replace=1, topk_method="greedy", n_group=1, topk_group=1,
        q_lora_rank=None, kv_lora_rank=None, use_mla=False, qk_nope_head_dim=0,
        qk_rope_head_dim=hidden_size // num_heads, v_head_dim=hidden_size // num_heads,  # MLA dims: unused
        image_token_id=IMAGE_TOKEN_ID,
        max_position_embeddings=8192, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        tie_word_embeddings=False, initializer_range=initializer_range, labelled_logits_only=labelled_logits_only,
    )  # fmt: skip
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["StandinOCRForCausalLM"]
    return config


def write_standin_checkpoint(
    folder, *, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
    n_routed_experts: int = 4, num_experts_per_tok: int = 2, n_shared_experts: int = 2,
    moe_intermediate_size: int = 32, intermediate_size: int = 128, vocab_size: int = 129280,
    dtype: torch.dtype = torch.float32, initializer_range: float = 0.1, labelled_logits_only: bool = False,
) -> Path:  # fmt: skip
    """Write config.json, model.safetensors (seeded random init), the modeling file, the tokenizer and a README
    into `folder`; load it back with AutoModel/AutoTokenizer.from_pretrained(folder, trust_remote_code=True).
    `initializer_range` is above HF's 0.02 so that a LoRA-only fine-tune of so small a model visibly moves its
    loss (at 0.02 the frozen lm_head keeps logits near uniform)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = standin_config(
        hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, n_routed_experts=n_routed_experts,
        num_experts_per_tok=num_experts_per_tok, n_shared_experts=n_shared_experts,
        moe_intermediate_size=moe_intermediate_size, intermediate_size=intermediate_size, vocab_size=vocab_size,
        initializer_range=initializer_range, labelled_logits_only=labelled_logits_only,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # deterministic per seed, without touching the caller's RNG
        torch.manual_seed(seed)
        model = StandinOCRForCausalLM(config).to(dtype).eval()
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(MODELING_FILE, folder / MODELING_FILE.name)
    write_tokenizer(folder, vocab_size=vocab_size)
    (folder / "README.md").write_text(README, encoding="utf-8")
    log.info("wrote the TEST STAND-IN checkpoint (random weights, not DeepSeek-OCR) to %s", folder)
    return folder
