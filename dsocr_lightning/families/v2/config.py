"""Model configs built from transformers' own classes: the public DeepSeek-OCR 2 sizes, and a tiny TEST STAND-IN.

The full-size numbers are those of `deepseek-ai/DeepSeek-OCR-2`'s config.json as transformers' conversion script
maps them (`convert_deepseek_ocr2_weights_to_hf.py`): v1's language model (DeepSeek-V2 MoE, 12 layers, hidden 1280,
64 routed experts of width 896, top 6, 2 shared, layer 0 dense) after SAM ViT-B and a Qwen2-0.5B encoder.
"""

from __future__ import annotations

from typing import Any

IMAGE_TOKEN = "<image>"

FULL_TEXT = {
    "vocab_size": 129280, "hidden_size": 1280, "intermediate_size": 6848, "moe_intermediate_size": 896,
    "num_hidden_layers": 12, "num_attention_heads": 10, "num_key_value_heads": 10, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "max_position_embeddings": 8192, "bos_token_id": 0, "eos_token_id": 1,
    "mlp_layer_types": ["dense"] + ["sparse"] * 11,
}  # fmt: skip
FULL_VISION = {
    "sam_config": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "global_attn_indexes": [2, 5, 8, 11], "downsample_channels": [512, 896]},
    "encoder_config": {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                       "intermediate_size": 4864, "rms_norm_eps": 1e-6, "vocab_size": 1,
                       "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
}  # fmt: skip


def full_size_config() -> Any:
    """DeepSeek-OCR 2 at its published size (3.4B parameters); build it on the meta device to count without weights."""
    from transformers import DeepseekOcr2Config

    config = DeepseekOcr2Config(text_config=dict(FULL_TEXT), vision_config=dict(FULL_VISION), image_token_id=128815)
    config.architectures = ["DeepseekOcr2ForConditionalGeneration"]
    return config


def tiny_config(vocab_size: int, image_token_id: int, initializer_range: float = 0.1) -> Any:
    """TEST STAND-IN sizes: the real geometry (SAM's 16 px patches, 1024 / 768 views, 256 / 144 queries) with tiny
    widths, 2 language layers (dense, then 4 experts of which 2 per token, 2 shared). Not DeepSeek-OCR 2."""
    from transformers import DeepseekOcr2Config

    text = {
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 4,
        "n_shared_experts": 2, "num_experts_per_tok": 2, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "max_position_embeddings": 4096, "mlp_layer_types": ["dense", "sparse"], "bos_token_id": 0, "eos_token_id": 1,
        "pad_token_id": 2, "initializer_range": initializer_range,
    }  # fmt: skip
    vision = {
        "sam_config": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "global_attn_indexes": [],
                       "output_channels": 16, "downsample_channels": [16, 32], "mlp_dim": 32},
        "encoder_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "num_key_value_heads": 1, "intermediate_size": 64, "vocab_size": 1,
                           "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    }  # fmt: skip
    config = DeepseekOcr2Config(text_config=text, vision_config=vision, image_token_id=image_token_id)
    config.architectures = ["DeepseekOcr2ForConditionalGeneration"]
    return config
