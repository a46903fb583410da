"""Greedy decoding with a static KV cache, each step one CUDA graph replay (the reference: `model.generate`).

`model.generate` dispatches every op of every new token from Python (12 decoder layers with LoRA, a growing
cache, mask building, n-gram blocking in Python per row): ~36 ms a token on an H100 at batch 1 (profiled: ~4,000
C-level calls a token), where reading the weights takes ~0.4 ms. Here the prompt is prefilled by the model's own forward (images included, as `generate`
does); its keys/values are copied into fixed buffers [B, heads, L, head_dim] with L = prompt + new tokens (rounded
up, so batches of nearby lengths share a graph). One decode step (embed, the model's own decoder layers with
their LoRA, norm, lm_head, n-gram block, argmax, EOS bookkeeping) reads and writes only fixed buffers, with the
current column as a device tensor: on CUDA it is captured once and replayed; on CPU it runs eagerly (the same
code, what the CPU tests compare with `generate`).

Shapes: B rows, P padded prompt length (left padding), L cache columns, V vocabulary, n the n-gram size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .grouped_mm import drop_cast_copies, native_runs_fused
from .layout import block_kernel, causal_lm, expert_blocks

if TYPE_CHECKING:
    from transformers.cache_utils import DynamicCache

log = logging.getLogger(__name__)
COLUMN_STEP = 128  # cache lengths are rounded up to this, so graphs are reused across batches


@dataclass
class DecoderParts:
    """The pieces of a DeepSeek-V2-style causal LM that one decode step runs, in order, and what differs between
    the model families that supply them."""

    embed: nn.Module
    rotary: nn.Module
    layers: list[nn.Module]
    norm: nn.Module
    lm_head: nn.Module
    eager_attention: bool  # additive float masks (eager attention) instead of boolean ones (SDPA)
    cache_arg: str = "past_key_values"  # the layers' keyword for the cache (transformers 5: `cache`)
    prefill: Callable | None = None  # (model, parts, prompt, mask, images) -> (logits, DynamicCache); None: `prefill`
    graph_blocker: str | None = None  # the family's reason to decode without CUDA graphs, else the layers decide


def decoder_parts(model: nn.Module) -> DecoderParts | None:
    """The decode-step pieces of `model` (a peft model or not), or None where its layout is not the one expected."""
    causal = causal_lm(model)
    inner = getattr(causal, "model", None)
    needed = ("embed_tokens", "rotary_emb", "layers", "norm")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(causal, "lm_head"):
        return None
    layers = list(inner.layers[: causal.config.num_hidden_layers])
    if not all(hasattr(getattr(layer, "self_attn", None), "layer_idx") for layer in layers):
        return None
    if any(type(m).forward.__module__.startswith("unsloth") for layer in layers for m in (layer, layer.self_attn)):
        return None  # Unsloth's own attention keeps its own cache
    implementation = getattr(causal.config, "_attn_implementation", "sdpa")
    if implementation not in ("sdpa", "eager"):
        return None
    return DecoderParts(inner.embed_tokens, inner.rotary_emb, layers, inner.norm, causal.lm_head,
                        implementation == "eager")  # fmt: skip


def graph_blocker(parts: DecoderParts) -> str | None:
    """Why a decode step of these layers cannot be captured as a CUDA graph, or None."""
    if parts.graph_blocker:
        return parts.graph_blocker
    blocks = expert_blocks(parts.layers)
    kernels = [block_kernel(block) for block in blocks]
    if not all(kernels):
        return "transformers' expert loop reads token counts back to the CPU: no CUDA graph"
    # an expert's own (frozen, first-registered) weight, not a stack: a device move reaches v1's stacks only at the
    # layer's next call
    weights = [next(block.experts.parameters()) for block in blocks]
    if any(kernel == "native" and not native_runs_fused(w.device, w.dtype) for kernel, w in zip(kernels, weights)):
        return "torch._grouped_mm has no fused kernel for these weights (ATen's fallback reads group sizes back)"
    return None


class StaticCache:
    """Keys/values of every layer in fixed buffers [B, heads, L, head_dim]; `update` writes the step's column (the
    decoder's own [1] long tensor) and returns the whole buffer (the only method the attention layers call)."""

    def __init__(self, like: DynamicCache, columns: int, column: torch.Tensor):
        shapes = [(*layer.keys.shape[:2], columns, layer.keys.shape[3]) for layer in like.layers]
        first = like.layers[0].keys
        self.keys = [first.new_zeros(shape) for shape in shapes]
        self.values = [first.new_zeros(shape) for shape in shapes]
        self.column = column

    def load(self, prefill: DynamicCache) -> None:
        """The prompt's keys/values into the first P columns; zeros after (never read, but finite)."""
        for mine, layer in zip(zip(self.keys, self.values), prefill.layers):
            for buffer, theirs in zip(mine, (layer.keys, layer.values)):
                buffer[:, :, : theirs.shape[2]] = theirs
                buffer[:, :, theirs.shape[2] :] = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object) -> tuple:
        keys, values = self.keys[layer_idx], self.values[layer_idx]  # (transformers 4 passes cache_kwargs, 5 kwargs=)
        keys.index_copy_(2, self.column, key.to(keys.dtype))  # as DynamicCache's concatenation promotes
        values.index_copy_(2, self.column, value.to(values.dtype))
        return self.keys[layer_idx], self.values[layer_idx]


def banned_ngram_mask(ids: torch.Tensor, length: torch.Tensor, size: int, vocab: int) -> torch.Tensor:
    """[B, V] bool: tokens that would repeat an n-gram of `ids[:, :length]` (transformers' NoRepeatNGram rule: ban
    ids[j+n-1] wherever ids[j : j+n-1] equals the last n-1 tokens, j <= length - n). `length`: [1] long tensor."""
    prefixes = ids.unfold(1, size - 1, 1)[:, : ids.shape[1] - size + 1]  # [B, W, n-1], window j = ids[j : j+n-1]
    last = ids.gather(
        1, (length - size + 1 + torch.arange(size - 1, device=ids.device)).clamp(min=0).expand(len(ids), -1)
    )
    starts = torch.arange(prefixes.shape[1], device=ids.device)
    match = (prefixes == last[:, None, :]).all(-1) & (starts <= length - size)  # [B, W]
    counts = torch.zeros(len(ids), vocab, device=ids.device).scatter_add_(1, ids[:, size - 1 :], match.float())
    return counts > 0


def banned_ngram_mask_reference(ids: torch.Tensor, length: int, size: int, vocab: int) -> torch.Tensor:
    """The same with Python dictionaries, row by row (the rule as transformers writes it)."""
    out = torch.zeros(len(ids), vocab, dtype=torch.bool)
    for row, tokens in enumerate(ids[:, :length].tolist()):
        seen: dict[tuple, list[int]] = {}
        for j in range(length - size + 1):
            seen.setdefault(tuple(tokens[j : j + size - 1]), []).append(tokens[j + size - 1])
        out[row, seen.get(tuple(tokens[length - size + 1 : length]), [])] = True
    return out


@dataclass(frozen=True)
class Rules:
    """What a step decides with (baked into a captured graph, so part of its key)."""

    ngram: int  # no_repeat_ngram_size (0 or 1: off)
    pad: int
    eos: int


class Decoder:
    """Greedy decoding for one batch shape [B, L]. `step()` feeds ids[:, column] and writes the next token at
    column + 1, which becomes the current column. Every tensor it touches keeps its address across batches."""

    def __init__(self, parts: DecoderParts, like: DynamicCache, shape: tuple[int, int], rules: Rules):
        rows, columns = shape
        device = like.layers[0].keys.device
        self.column = torch.zeros(1, dtype=torch.long, device=device)  # cache column of the fed token
        self.parts, self.rules, self.cache = parts, rules, StaticCache(like, columns, self.column)
        self.ids = torch.zeros(rows, columns, dtype=torch.long, device=device)  # prompt (padding included), new
        self.valid = torch.zeros(rows, columns, dtype=torch.bool, device=device)  # columns attention may read
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)  # position id of the fed token
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(self, prefill: DynamicCache, prompt: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """A new batch: its prompt and prefilled cache, then the first new token from the prefill's logits."""
        width = prompt.shape[1]
        self.cache.load(prefill)
        self.ids.zero_()[:, :width] = prompt
        self.valid.zero_()[:, :width] = mask.bool()
        self.position.copy_(mask.long().sum(1, keepdim=True) - 1)  # the last prompt token's position
        self.column.fill_(width - 1)
        self.finished.zero_()
        self.choose(logits)

    def logits(self) -> torch.Tensor:
        """[B, V] float32 logits for the token at `column`."""
        parts = self.parts
        hidden = parts.embed(self.ids.gather(1, self.column.expand(len(self.ids), 1)))  # [B, 1, H]
        embeddings = parts.rotary(hidden, self.position)
        mask = self.valid[:, None, None, :]
        if parts.eager_attention:
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(hidden.dtype).min
            )
        for layer in parts.layers:
            out = layer(hidden, attention_mask=mask, position_ids=self.position, use_cache=True,
                        cache_position=self.column, position_embeddings=embeddings, **{parts.cache_arg: self.cache})  # fmt: skip
            hidden = out[0] if isinstance(out, tuple) else out
        return parts.lm_head(parts.norm(hidden)[:, -1]).float()

    def choose(self, logits: torch.Tensor) -> None:
        """Greedy pick after the n-gram block, PAD for finished rows, written at column + 1 (then the current one)."""
        following = self.column + 1
        if self.rules.ngram > 1:
            banned = banned_ngram_mask(self.ids, following, self.rules.ngram, logits.shape[-1])
            logits = logits.masked_fill(banned, float("-inf"))
        token = torch.where(self.finished, self.rules.pad, logits.argmax(-1))
        self.finished |= token == self.rules.eos
        self.ids.index_copy_(1, following, token[:, None])
        self.valid.index_fill_(1, following, True)
        self.position += 1
        self.column += 1

    def step(self) -> None:
        self.choose(self.logits())

    def replay(self) -> None:
        self.step() if self.graph is None else self.graph.replay()

    def capture(self) -> None:
        """Record `step` as a CUDA graph. CUDA graphs want a warm-up on a side stream first; it is a real step (the
        caller counts it). Capturing itself runs nothing."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may allocate while this thread captures
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.step()


def output_width(new: torch.Tensor, finished: torch.Tensor, eos: int) -> int:
    """How many new tokens `generate` returns: up to the last row's first EOS once every row has ended."""
    if not bool(finished.all()):
        return new.shape[1]
    return int((new == eos).int().argmax(1).max()) + 1


def prefill(model: nn.Module, parts: DecoderParts, prompt: torch.Tensor, mask: torch.Tensor, images: dict) -> tuple:
    """The model's own forward over the prompts (vision included), as `generate`'s first step: (last logits [B, V]
    float32, DynamicCache). lm_head runs on the last position only."""
    from transformers.cache_utils import DynamicCache

    causal = causal_lm(model)
    positions = torch.arange(prompt.shape[1], device=prompt.device)
    inputs = causal.prepare_inputs_for_generation(prompt, past_key_values=DynamicCache(), attention_mask=mask,
                                                  use_cache=True, cache_position=positions, **images)  # fmt: skip
    hook = parts.lm_head.register_forward_pre_hook(lambda module, args: (args[0][:, -1:], *args[1:]))
    try:
        out = causal(**inputs, return_dict=True)
    finally:
        hook.remove()
    return out.logits[:, -1].float(), out.past_key_values


class ModelState:
    """What a captured graph depends on beyond its inputs: the storages of the model's parameters and whether its
    adapters are merged or disabled. Which parameters and LoRA layers there are is read once (walking the ~26,000
    modules of the real model costs ~0.1 s, too much per call); their storages and flags are compared every call."""

    def __init__(self, model: nn.Module):
        self.params = list(model.parameters())
        self.lora_layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        self.recorded = self.now()

    def now(self) -> tuple:
        flags = tuple((m.merged, m.disable_adapters) for m in self.lora_layers)
        return tuple(p.data_ptr() for p in self.params), flags

    def unchanged(self) -> bool:
        return self.now() == self.recorded


def decoder_for(model: nn.Module, parts: DecoderParts, like: DynamicCache, shape: tuple, rules: Rules) -> Decoder:
    """The decoder kept on the model for this shape, rules, autocast and model state, else a new one (one is kept:
    its cache buffers are the memory that decoding holds)."""
    device = like.layers[0].keys.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    key = (shape, rules, like.layers[0].keys.dtype, autocast)
    kept = getattr(model, "_static_decoder", None)
    state = kept[2] if kept is not None and kept[2].unchanged() else None
    if state is not None and kept[0] == key:
        return kept[1]
    model._static_decoder = None  # free the old buffers first
    decoder = Decoder(parts, like, shape, rules)
    model._static_decoder = (key, decoder, state or ModelState(model))
    return decoder


def release_decoder(model: nn.Module) -> None:
    """Drop the kept decoder (its KV buffers and graph) and the LoRA weights cast for it, e.g. when validation ends
    and training resumes."""
    model._static_decoder = None
    drop_cast_copies(model)


@torch.no_grad()
def static_generate(
    model: nn.Module,
    parts: DecoderParts,
    prompt: torch.Tensor,
    mask: torch.Tensor,
    images: dict,
    max_new_tokens: int,
    rules: Rules,
    graphs: bool,
    check_every: int = 16,
) -> torch.Tensor:
    """New token ids [B, T_new] (PAD after EOS), the tokens of `model.generate(..., do_sample=False)`."""
    device = prompt.device.type
    # autocast's cache of cast weights lives until the outer autocast exits: a graph that captured a cached copy
    # would read freed memory in the next call. Without the cache the casts are part of the graph.
    with torch.autocast(
        device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device), cache_enabled=False
    ):
        return decode(model, parts, prompt, mask, images, max_new_tokens, rules, graphs, check_every)


def decode(model: nn.Module, parts: DecoderParts, prompt: torch.Tensor, mask: torch.Tensor, images: dict,
           max_new_tokens: int, rules: Rules, graphs: bool, check_every: int) -> torch.Tensor:  # fmt: skip
    logits, prefilled = (parts.prefill or prefill)(model, parts, prompt, mask, images)
    columns = -(-(prompt.shape[1] + max_new_tokens) // COLUMN_STEP) * COLUMN_STEP
    decoder = decoder_for(model, parts, prefilled, (prompt.shape[0], columns), rules)
    decoder.load(prefilled, prompt, mask, logits)
    done = 1
    if graphs and decoder.graph is None and max_new_tokens > 1:
        start = time.perf_counter()
        decoder.capture()
        done += 1
        log.info("decoding: captured a CUDA graph of one step for %d rows x %d columns in %.2f s",
                 *decoder.ids.shape, time.perf_counter() - start)  # fmt: skip
    while done < max_new_tokens and not (done % check_every == 0 and bool(decoder.finished.all())):
        decoder.replay()
        done += 1
    start = prompt.shape[1]
    new = decoder.ids[:, start : start + done]
    return new[:, : output_width(new, decoder.finished, rules.eos)].clone()
