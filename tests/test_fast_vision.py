"""Batched vision towers (fast/vision.py) give what the per-sample loop gives, with one tower call per chunk.

The towers here are toys laid out like DeepSeek-OCR's remote code (an owner module with `sam_model`,
`vision_model(pixels, sam_features)` and `projector`, encoding one sample at a time under no_grad); the real
towers are compared on the GPU (benchmarks/train_speed.py checks the loss with and without batching).
"""

import torch
from torch import nn

from dsocr_lightning.fast.vision import patch_batched_vision


class ToySam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.calls = 0

    def forward(self, pixels):
        self.calls += 1
        return self.conv(pixels)  # [P, 4, s/8, s/8]


class ToyClip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4 + 3 * 64, 6)
        self.calls = 0

    def forward(self, pixels, sam):
        self.calls += 1
        patches = pixels.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        return self.mix(torch.cat([sam.flatten(2).transpose(1, 2), patches], dim=-1))  # [P, n, 6]


class ToyOwner(nn.Module):
    """Encodes sample by sample like the remote code: crops first when they are not all zero, then the global view."""

    def __init__(self) -> None:
        super().__init__()
        self.sam_model, self.vision_model, self.projector = ToySam(), ToyClip(), nn.Linear(6, 5)

    def encode(self, view):
        return self.projector(self.vision_model(view, self.sam_model(view))).flatten(0, 1)

    def forward(self, input_ids=None, images=None):
        out = []
        with torch.no_grad():
            for crops, glob in images:
                parts = [self.encode(crops)] if torch.sum(crops).item() != 0 else []
                out.append(torch.cat([*parts, self.encode(glob)]))
        return out


def sample_images(count: int):
    torch.manual_seed(0)
    images = []
    for i in range(count):
        crops = torch.randn(3, 3, 16, 16) if i % 3 == 1 else torch.zeros(1, 3, 32, 32)  # every third has crops
        images.append((crops, torch.randn(1, 3, 32, 32)))
    return images


def test_batched_towers_give_the_per_sample_results():
    owner = ToyOwner()
    images = sample_images(7)
    ids = torch.ones(7, 5, dtype=torch.long)
    expected = owner(input_ids=ids, images=images)
    calls = owner.sam_model.calls
    assert calls == 7 + 2
    assert patch_batched_vision(owner, chunk=4)
    got = owner(input_ids=ids, images=images)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert owner.sam_model.calls - calls == 2 + 1  # globals in 2 chunks of <= 4, the two crop sets in one
    assert not owner._view_cache.entries  # the cache lives for one call


def test_other_inputs_and_decode_steps_run_as_before():
    owner = ToyOwner().eval()
    patch_batched_vision(owner)
    images = sample_images(2)
    owner(input_ids=torch.ones(2, 1, dtype=torch.long), images=images)  # a decode step: no batched pre-pass
    assert owner.sam_model.calls == 2 + 1  # per sample, as without the patch (sample 1 has crops)
    assert not patch_batched_vision(nn.Linear(2, 2))  # no towers: nothing to patch (e.g. the test stand-in)
