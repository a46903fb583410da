"""Batched vision towers for DeepSeek-OCR's remote code: all views of a batch through SAM and CLIP in a few calls.

The remote code encodes one sample at a time (`sam_model(view)`, then `vision_model(view, sam_features)`, under
`torch.no_grad`): ~800 small kernels per sample, launched from Python. A pre-forward hook on the model that owns
the towers runs them once per chunk of samples instead and leaves the results in a cache keyed by the very view
tensors the per-sample code then passes in; the towers' `forward` answers from it (anything else is computed as
before). The towers are frozen and run without autograd either way. The cache lives for one forward call.
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


def tower_owner(model: nn.Module) -> nn.Module | None:
    """The module holding `sam_model`, `vision_model` and `projector` (DeepSeek-OCR's inner model), if any."""
    for module in model.modules():
        if all(isinstance(getattr(module, n, None), nn.Module) for n in ("sam_model", "vision_model", "projector")):
            return module
    return None


class ViewCache:
    """Outputs of SAM and CLIP for the views of the current call, looked up by the identity of the view tensor."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # id -> (view, sam, clip)

    def get(self, view: torch.Tensor, which: int) -> torch.Tensor | None:
        entry = self.entries.get(id(view))
        return entry[which] if entry is not None and entry[0] is view else None


def views_of(images: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """The tensors the per-sample code will encode: every global view, and the crops of samples that have any
    (all-zero crops mean none, as the remote code tests it)."""
    return [glob for _, glob in images] + [crops for crops, _ in images if bool(crops.any())]


@torch.no_grad()
def encode_batched(owner: nn.Module, views: list[torch.Tensor], chunk: int, cache: ViewCache) -> None:
    """SAM then CLIP over views of one shape at a time, `chunk` views per call; results split back per view."""
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for view in views:
        by_shape.setdefault(tuple(view.shape[1:]), []).append(view)
    for group in by_shape.values():
        for start in range(0, len(group), chunk):
            part = group[start : start + chunk]
            pixels = torch.cat(part)  # [sum of P, 3, s, s]
            sam = owner.sam_model._original_forward(pixels)
            clip = owner.vision_model._original_forward(pixels, sam)
            sizes = [v.shape[0] for v in part]
            for view, s, c in zip(part, sam.split(sizes), clip.split(sizes)):
                cache.entries[id(view)] = (view, s, c)


def cached_forward(tower: nn.Module, cache: ViewCache, which: int):
    def forward(self, pixels, *args, **kwargs):
        hit = cache.get(pixels, which)
        return hit if hit is not None else self._original_forward(pixels, *args, **kwargs)

    return types.MethodType(forward, tower)


def patch_batched_vision(model: nn.Module, chunk: int = 8) -> bool:
    """Batch `model`'s vision towers per call (False when it has none, e.g. the test stand-in)."""
    owner = tower_owner(model)
    if owner is None or hasattr(owner, "_view_cache"):
        return owner is not None
    owner._view_cache = cache = ViewCache()
    for which, tower in ((1, owner.sam_model), (2, owner.vision_model)):
        tower._original_forward = tower.forward
        tower.forward = cached_forward(tower, cache, which)

    def fill(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        images, ids = kwargs.get("images"), kwargs.get("input_ids")
        prefill = ids is None or ids.shape[1] != 1 or module.training  # the remote code's own condition
        if images and prefill:
            encode_batched(owner, views_of(images), chunk, cache)

    owner.register_forward_pre_hook(fill, with_kwargs=True)
    owner.register_forward_hook(lambda *_: cache.entries.clear())
    return True
