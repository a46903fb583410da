"""How a v1 batch travels from the DataLoader workers to the device, and back into the collator's layout there.

The collator's layout (the model's contract) holds pixels as float32 in [-1, 1], and a line image, which has no
crops, carries a zero placeholder crop of the global view's size: a line weighs 25 MB ([1, 3, 1024, 1024] twice).
Workers hand batches over through shared memory, the main process pins them and copies them to the GPU: CPU time in
a CPU-bound step. Here pixels travel as the bytes they were made from (`images.to_tensor`: (x / 255 - 0.5) / 0.5)
and the placeholder as an empty tensor, 3 MB a line; on the device a lookup table gives back the very same float32
values. `expand(compact(batch))` equals the collator's batch bit for bit (tests/test_transport.py).
"""

from __future__ import annotations

from typing import Any

import torch

# what images.to_tensor makes of each byte value, computed by the same CPU operations
PIXEL_OF_BYTE = torch.arange(256, dtype=torch.float32).div(127.5).sub(1.0)


def to_bytes(pixels: torch.Tensor) -> torch.Tensor:
    """float32 pixels -> the uint8 they came from; refuses pixels that no byte gives (a bug upstream, not data)."""
    codes = pixels.add(1.0).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)
    if not torch.equal(PIXEL_OF_BYTE[codes.long()], pixels):
        raise ValueError("pixels that no byte value gives: not made by images.to_tensor")
    return codes


def from_bytes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 -> the float32 pixels of the collator, on the codes' device."""
    return PIXEL_OF_BYTE.to(codes.device)[codes.long()]


def compact(batch: dict[str, Any]) -> dict[str, Any]:
    """Pixels as bytes; the placeholder crops of rows without crops (grid [1, 1]) as empty tensors (worker side)."""
    grids = batch["images_spatial_crop"].tolist()
    batch["images"] = [
        (crops.new_empty((0, *crops.shape[1:]), dtype=torch.uint8) if grid == [1, 1] else to_bytes(crops),
         to_bytes(glob))
        for (crops, glob), grid in zip(batch["images"], grids)
    ]  # fmt: skip
    return batch


def expand(batch: dict[str, Any]) -> dict[str, Any]:
    """The collator's layout again (device side): float32 pixels, zeros [1, 3, S, S] where the placeholder was."""
    batch["images"] = [
        (torch.zeros((1, *crops.shape[1:]), device=crops.device) if crops.shape[0] == 0 else from_bytes(crops),
         from_bytes(glob))
        if glob.dtype == torch.uint8 else (crops, glob)
        for crops, glob in batch["images"]
    ]  # fmt: skip
    return batch
