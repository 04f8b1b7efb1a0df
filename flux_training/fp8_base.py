"""fp8 base weights while a LoRA trains: the frozen linear weights of the transformer blocks are stored in
float8_e4m3fn and upcast layer by layer as they run (the pack's `flux_models.fp8_storage`), halving the weights'
device memory against bf16; the LoRA tensors stay float32. The original weights wait in CPU memory and are put back
exactly on exit, because the model a node trains on is shared with the rest of the graph."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..flux_models.fp8_storage import _WIDE, _restore, _upcast

FP8 = torch.float8_e4m3fn


@contextlib.contextmanager
def fp8_base_weights(transformer: torch.nn.Module, compute: torch.dtype) -> Iterator[int]:
    """Store the blocks' linear weights in fp8 for the duration; yields how many layers were converted. Layers the
    model already keeps in fp8 (an fp8 file) are left as they are."""
    kept: list[tuple[torch.nn.Linear, torch.Tensor, list]] = []
    try:
        for name, module in transformer.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.startswith(_WIDE) or module.weight.dtype == FP8:
                continue
            original = module.weight.data
            module.weight.data = original.to(FP8)
            module._fp8_compute_dtype = compute
            hooks = [module.register_forward_pre_hook(_upcast), module.register_forward_hook(_restore)]
            kept.append((module, original.to("cpu", copy=True) if original.device.type != "cpu" else original, hooks))
        yield len(kept)
    finally:
        for module, original, hooks in kept:
            for hook in hooks:
                hook.remove()
            module.weight.data = original.to(module.weight.device)
            del module._fp8_compute_dtype
