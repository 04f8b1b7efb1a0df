"""fp8 weight storage: a linear's weight is kept in fp8 and upcast for the duration of its forward, while
its bias and every norm, embedding and vector stay at compute precision (as the fp8 files store them).

The weight stays the module's `weight` parameter between calls, so ComfyUI's weight patching (LoRA) finds
it under its usual name."""

from __future__ import annotations

import torch

# Small layers at the model's ends keep full precision when fp8 is chosen for a bf16/fp16 file.
_WIDE = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")


def _upcast(module: torch.nn.Linear, _args) -> None:
    stored = module._parameters["weight"]
    module._fp8_stored_weight = stored
    module._parameters["weight"] = stored.to(module._fp8_compute_dtype)


def _restore(module: torch.nn.Linear, _args, _output) -> None:
    module._parameters["weight"] = module._fp8_stored_weight
    del module._fp8_stored_weight


def keep_linear_weights_in(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype,
                           only: set[str] | None = None) -> int:
    """Store linear weights as `storage`: the layers named in `only`, or all but the end layers when None."""
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if only is not None and name not in only:
            continue
        if only is None and name.startswith(_WIDE):
            continue
        module.weight.data = module.weight.data.to(storage)
        module._fp8_compute_dtype = compute
        module.register_forward_pre_hook(_upcast)
        module.register_forward_hook(_restore)
        count += 1
    return count
