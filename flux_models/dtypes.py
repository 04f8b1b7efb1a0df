"""Weight dtype names used by the loaders and the handling of fp8 checkpoints."""

from __future__ import annotations

import torch

DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
WEIGHT_DTYPE_CHOICES = ("default", *DTYPES)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8


def dequantize_scaled_fp8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's "scaled fp8" files store `w_fp8` with `<layer>.scale_weight`; fold the scale back in
    (to float32) and drop the scale/marker keys, so the rest of the loader sees plain weights."""
    scales = {k[: -len(".scale_weight")]: v for k, v in state.items() if k.endswith(".scale_weight")}
    if not scales and "scaled_fp8" not in state:
        return state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "scaled_fp8" or key.endswith((".scale_weight", ".scale_input")):
            continue
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer in scales:
            value = value.to(torch.float32) * scales[layer].to(torch.float32)
        out[key] = value
    return out


def storage_and_compute(
    weight_dtype: str, file_dtype: torch.dtype, default_compute: torch.dtype
) -> tuple[torch.dtype, torch.dtype]:
    """The dtype weights are kept in and the dtype the math runs in, for a loader's `weight_dtype` choice.

    `default` computes in the device's preferred dtype and keeps fp8 files in fp8 (they were made to save
    memory); an explicit fp8 choice stores fp8 and computes in the default dtype.
    """
    if weight_dtype not in WEIGHT_DTYPE_CHOICES:
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPE_CHOICES}, got {weight_dtype!r}")
    if weight_dtype == "default":
        return (file_dtype if is_fp8(file_dtype) else default_compute), default_compute
    chosen = DTYPES[weight_dtype]
    if is_fp8(chosen):
        return chosen, default_compute
    return chosen, chosen
