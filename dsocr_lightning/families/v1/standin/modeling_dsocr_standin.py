"""TEST STAND-IN for DeepSeek-OCR: a tiny model with random weights, NOT DeepSeek-OCR.

It only mimics the *interfaces* the fine-tuning code relies on, so tests can run on a CPU, offline:

* the language model is transformers' own DeepSeek-V2 (dense layer 0, MoE layers after it with routed and
  shared experts), but with plain multi-head attention whose Linear layers are named q/k/v/o_proj, like the
  real checkpoint (`use_mla=False`);
* a toy vision part (one strided Conv2d, `image_newline`, `view_separator`) whose module names hold none of
  the LoRA target names, producing the same number of image tokens per view as the real model;
* the real forward contract (`images`, `images_seq_mask`, `images_spatial_crop`) and batched generation.

Self-contained on purpose (imports only torch and transformers): it is copied next to config.json and loaded
with `trust_remote_code=True`, exactly like the real remote code.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV2Config
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
    DeepseekV2DecoderLayer,
    DeepseekV2ForCausalLM,
    DeepseekV2MLP,
    DeepseekV2Model,
    DeepseekV2MoE,
    DeepseekV2PreTrainedModel,
    DeepseekV2RMSNorm,
)
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding


class StandinOCRConfig(DeepseekV2Config):
    """DeepSeek-V2 config without MLA, plus the few vision fields the stand-in needs."""

    model_type = "dsocr_standin"

    def __init__(
        self, image_token_id: int = 128815, vision_patch: int = 64, use_mla: bool = False,
        labelled_logits_only: bool = False, **kwargs,
    ):  # fmt: skip
        # No MLA: plain q/k/v/o projections (as in DeepSeek-OCR's 3B MoE decoder).
        kwargs.setdefault("q_lora_rank", None)
        kwargs.setdefault("kv_lora_rank", None)
        super().__init__(**kwargs)
        self.image_token_id = image_token_id
        self.vision_patch = vision_patch  # 16-pixel patches x 4 downsampling = one token per 64x64 pixels
        self.use_mla = use_mla
        # CPU shortcut: with labels, run lm_head only where a label is learned (the same loss, `logits` None);
        # the 129,280-row lm_head over every image position is most of a training step's time on a CPU.
        self.labelled_logits_only = labelled_logits_only
        # DeepseekV2Config sets head_dim = qk_rope_head_dim; the Llama-style attention needs hidden / heads.
        self.head_dim = self.hidden_size // self.num_attention_heads


class StandinDecoderLayer(DeepseekV2DecoderLayer):
    """DeepSeek-V2 decoder layer whose attention is Llama-style MHA (q/k/v/o_proj, real-valued rotary)."""

    def __init__(self, config: StandinOCRConfig, layer_idx: int):
        # Skip DeepseekV2DecoderLayer.__init__: its MLA attention cannot be built with kv_lora_rank=None.
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        dense = layer_idx < config.first_k_dense_replace
        self.mlp = DeepseekV2MLP(config) if dense else DeepseekV2MoE(config)
        self.input_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class StandinOCRPreTrainedModel(DeepseekV2PreTrainedModel):
    config_class = StandinOCRConfig
    config: StandinOCRConfig
    _no_split_modules: ClassVar[list[str]] = ["StandinDecoderLayer"]
    _can_record_outputs: ClassVar[dict] = {"hidden_states": StandinDecoderLayer, "attentions": LlamaAttention}

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, StandinOCRModel):
            std = self.config.initializer_range
            module.image_newline.data.normal_(mean=0.0, std=std)
            module.view_separator.data.normal_(mean=0.0, std=std)


class StandinOCRModel(StandinOCRPreTrainedModel, DeepseekV2Model):
    """DeepseekV2Model (forward inherited) + toy vision encoder; names avoid every LoRA target."""

    def __init__(self, config: StandinOCRConfig):
        DeepseekV2PreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(StandinDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DeepseekV2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)  # yields (cos, sin), not complex freqs
        self.gradient_checkpointing = False
        # Vision: one token per 64x64 pixels, like SAM patch 16 + 4x compressor in the real model.
        p = config.vision_patch
        self.vision_patchify = nn.Conv2d(3, config.hidden_size, kernel_size=p, stride=p)
        self.image_newline = nn.Parameter(torch.zeros(config.hidden_size))
        self.view_separator = nn.Parameter(torch.zeros(config.hidden_size))
        self.post_init()

    def encode_view(self, pixels: torch.Tensor) -> torch.Tensor:
        """[P,3,s,s] -> [P, n, n, hidden] with n = ceil(s / patch) (view zero-padded to a multiple)."""
        p = self.config.vision_patch
        pad = math.ceil(pixels.shape[-1] / p) * p - pixels.shape[-1]
        pad_h = math.ceil(pixels.shape[-2] / p) * p - pixels.shape[-2]
        weight = self.vision_patchify.weight
        pixels = F.pad(pixels.to(weight.device, weight.dtype), (0, pad, 0, pad_h))
        return self.vision_patchify(pixels).permute(0, 2, 3, 1)

    def _with_newlines(self, grid: torch.Tensor) -> torch.Tensor:
        """[rows, cols, hidden] -> [rows * (cols + 1), hidden]: one image_newline after every row."""
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, -1)
        return torch.cat([grid, newline], dim=1).flatten(0, 1)

    def image_features(self, crops: torch.Tensor, global_view: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
        """Features of one sample, in prompt order: [crop grid rows], global grid rows, separator."""
        parts = []
        if torch.count_nonzero(crops) > 0:
            cols, rows = int(spatial[0]), int(spatial[1])  # i columns, j rows of tiles
            tiles = self.encode_view(crops)  # [P, m, m, h], tile k at (k // i, k % i)
            m, h = tiles.shape[1], tiles.shape[-1]
            grid = tiles.view(rows, cols, m, m, h).permute(0, 2, 1, 3, 4).reshape(rows * m, cols * m, h)
            parts.append(self._with_newlines(grid))  # (m*i + 1) * (m*j)
        parts.append(self._with_newlines(self.encode_view(global_view)[0]))  # (n + 1) * n
        parts.append(self.view_separator.to(parts[-1].dtype)[None])  # 1
        return torch.cat(parts, dim=0)

    @torch.no_grad()
    def merge_images(self, inputs_embeds, images, images_seq_mask, images_spatial_crop):
        """All samples' image features [N,h] (batch order) and the bool mask [B,L] of where they go."""
        mask = images_seq_mask.to(inputs_embeds.device).bool()
        feats = []
        for b, (crops, global_view) in enumerate(images):
            f = self.image_features(crops, global_view, images_spatial_crop[b])
            if int(mask[b].sum()) != f.shape[0]:
                raise ValueError(
                    f"sample {b}: images_seq_mask has {int(mask[b].sum())} image positions but the images "
                    f"give {f.shape[0]} image tokens (spatial crop {images_spatial_crop[b].tolist()})"
                )
            feats.append(f)
        feats = torch.cat(feats).to(inputs_embeds.dtype)
        return feats, mask


class StandinOCRForCausalLM(StandinOCRPreTrainedModel, DeepseekV2ForCausalLM):
    """TEST STAND-IN with DeepSeek-OCR's forward/generate contract; random weights, not DeepSeek-OCR."""

    def __init__(self, config: StandinOCRConfig):
        DeepseekV2PreTrainedModel.__init__(self, config)
        self.model = StandinOCRModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _embed(self, input_ids, inputs_embeds, images, images_seq_mask, images_spatial_crop):
        """Token embeddings [B,L,h], with image features scattered in on prefill / training."""
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        seq_len = inputs_embeds.shape[1]
        if images is None or images_seq_mask is None or not (seq_len > 1 or self.training):
            return inputs_embeds  # 1-token decode steps reuse the cache: no vision
        feats, mask = self.model.merge_images(inputs_embeds, images, images_seq_mask, images_spatial_crop)
        # Out of place, so autograd sees a fresh tensor (embeddings may need grads under LoRA/checkpointing).
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1), feats)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images=None,
        images_seq_mask: torch.Tensor | None = None,
        images_spatial_crop: torch.Tensor | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        kwargs.pop("num_items_in_batch", None)  # trainer bookkeeping, not a model input
        if use_cache is None and self.training:
            use_cache = False  # no KV cache while training (and no warning under gradient checkpointing)
        embeds = self._embed(input_ids, inputs_embeds, images, images_seq_mask, images_spatial_crop)
        out = self.model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, cache_position=cache_position, **kwargs,
        )  # fmt: skip
        hidden = out.last_hidden_state
        if labels is not None and self.config.labelled_logits_only:
            logits, loss = None, self.labelled_loss(hidden, labels)
        else:
            logits = self.lm_head(hidden[:, -logits_to_keep:]).float()  # [B, L or logits_to_keep, vocab]
            loss = None if labels is None else shifted_loss(logits, labels)
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=out.past_key_values,
            hidden_states=out.hidden_states, attentions=out.attentions,
        )  # fmt: skip
        return result if return_dict is not False else result.to_tuple()

    def labelled_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy from the hidden states [B, L, h] of the positions whose next label is
        learned: what `shifted_loss` gives over the full logits, at a fraction of the lm_head work."""
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != -100
        return F.cross_entropy(self.lm_head(hidden[:, :-1][keep]).float(), targets[keep])

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        """GenerationMixin's default (cache slicing, position ids = cumsum(mask) - 1 for left padding), with
        the images kept for the prefill step only."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, past_key_values=past_key_values, attention_mask=attention_mask, **kwargs
        )
        cache_position = inputs.get("cache_position")
        prefill = cache_position is None or int(cache_position[0]) == 0
        if not prefill:
            for key in ("images", "images_seq_mask", "images_spatial_crop"):
                inputs[key] = None
        return inputs


def shifted_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with input_ids, shifted here: token t + 1 is predicted from positions <= t."""
    shift_labels = labels[:, 1:].to(logits.device).reshape(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shift_labels, ignore_index=-100)
