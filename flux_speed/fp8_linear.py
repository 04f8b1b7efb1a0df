"""fp8 matmul linears: weights stored as float8_e4m3fn, activations quantised on the fly, product by
`torch._scaled_mm` on GPUs with fp8 tensor cores (Ada, Hopper, newer). Two scalings:

- "rowwise": one scale per weight row and per activation token (closest to bf16; cuBLAS rowwise kernel).
- "tensorwise": one scale for the whole weight (fixed at quantisation) and one for the whole activation
  (its amax, computed on the device, so no host sync); cuBLAS's tensorwise path is the fastest fp8 GEMM and
  takes the bias in its epilogue, at a coarser activation scale.

Two options on top of either scaling:

- `fast_accum`: `_scaled_mm(use_fast_accum=True)`, cuBLAS's faster fp8 accumulation (what most fp8 inference
  engines use; partial sums are not promoted to full fp32 as often). It exists only on the GPU: the CPU
  emulation always accumulates in fp32, so CPU tests do not see its (small) extra error.
- activations "calibrated": instead of an amax reduction over every activation at every call, the first
  sampling step measures each linear's activation amax (per tensor), then a static scale (amax x
  CALIBRATION_HEADROOM, larger values clamped) is frozen, so later steps quantise with a pointwise
  clamp+cast that Inductor can fuse into the producer. Per tensor, because `_scaled_mm` takes only per-tensor or
  per-token activation scales and tokens change with the image; per input channel would need folding scales
  into the weights. Scales are per sampling run (see `start_calibration` / `freeze_calibration`).

Elsewhere the same quantised arithmetic is emulated in float32, so CPU tests check the same function."""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
FP8_SCALINGS = ("rowwise", "tensorwise")
FP8_ACTIVATIONS = ("dynamic", "calibrated")
CALIBRATION_HEADROOM = 1.25  # static scale covers 1.25x the calibrated amax; larger values are clamped
_EPILOGUE_BIAS_DTYPES = (torch.bfloat16, torch.float16)  # _scaled_mm takes a bias only for these outputs


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> fp8 values and (N, 1) float32 scales with x ≈ values * scales (per-row absmax)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return _to_fp8(x, scale), scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any shape -> fp8 values and one 0-dim float32 scale (absmax of the whole tensor). The amax stays on
    the device, so quantising activations inside a compiled block never waits for the host."""
    scale = x.abs().amax().float().clamp_min(1e-12) / E4M3_MAX
    return _to_fp8(x, scale), scale


def check_scaling(scaling: str) -> str:
    if scaling not in FP8_SCALINGS:
        raise ValueError(f"fp8 scaling must be one of {FP8_SCALINGS}, got {scaling!r}")
    return scaling


def check_activations(activations: str) -> str:
    if activations not in FP8_ACTIVATIONS:
        raise ValueError(f"fp8 activations must be one of {FP8_ACTIVATIONS}, got {activations!r}")
    return activations


def fp8_matmul_supported(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= (8, 9)


class Fp8Linear(torch.nn.Module):
    """Drop-in for nn.Linear (inference): y = (q(x) s_x) (q(W) s_W)^T + b, computed in fp8 where possible.
    `scaling` picks rowwise or tensorwise weight scales; `activations` dynamic (per-call amax, per token or
    per tensor as `scaling`) or calibrated (one static per-tensor scale); see the module docstring."""

    def __init__(self, linear: torch.nn.Linear, out_dtype: torch.dtype, scaling: str = "rowwise",
                 fast_accum: bool = False, activations: str = "dynamic",
                 work_device: torch.device | None = None) -> None:
        """`work_device`: where to quantise (e.g. the GPU for weights held in CPU memory for block offload);
        the results stay where the weight was."""
        super().__init__()
        self.scaling = check_scaling(scaling)
        self.activations = check_activations(activations)
        self.fast_accum = fast_accum
        home = linear.weight.device
        weight = linear.weight.detach().to(work_device or home)
        if scaling == "rowwise":
            weight, scale = quantize_rows(weight)
            scale = scale.reshape(1, -1).contiguous()  # (1, N), the layout _scaled_mm wants for scale_b
        else:
            weight, scale = quantize_tensor(weight)  # scale: 0-dim float32
        weight, scale = weight.to(home), scale.to(home)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(
            linear.bias.detach().to(out_dtype), requires_grad=False)
        self.out_dtype = out_dtype
        # Calibrated activations: a plain bool (compiled code guards on it, so calibrate -> frozen is one
        # recompile per block kind, and both graphs stay cached) and two 0-dim buffers updated in place.
        self.calibrating = activations == "calibrated"
        if activations == "calibrated":
            self.register_buffer("input_amax", torch.zeros((), dtype=torch.float32, device=weight.device))
            self.register_buffer("input_scale", torch.ones((), dtype=torch.float32, device=weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.activations == "calibrated" and not self.calibrating:
            xq, xs = _to_fp8(x2, self.input_scale), self.input_scale  # pointwise: no reduction
        else:
            if self.calibrating:
                self.input_amax.copy_(torch.maximum(self.input_amax, x2.abs().amax().float()))
            xq, xs = quantize_rows(x2) if self.scaling == "rowwise" else quantize_tensor(x2)
        bias_in_gemm = self.scaling == "tensorwise" and self.out_dtype in _EPILOGUE_BIAS_DTYPES
        if fp8_matmul_supported(x.device):
            if self.scaling == "rowwise" and xs.dim() == 0:
                xs = xs.expand(x2.shape[0], 1).contiguous()  # rowwise GEMM wants an (M, 1) scale_a
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale,
                                 bias=self.bias if bias_in_gemm else None, out_dtype=self.out_dtype,
                                 use_fast_accum=self.fast_accum)
        else:
            y = self._emulate(xq, xs, self.bias if bias_in_gemm else None)
        if self.bias is not None and not bias_in_gemm:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _emulate(self, xq: torch.Tensor, xs: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """_scaled_mm's arithmetic in float32: exact fp8 values, scaled, fp32 accumulation, one rounding.
        (fast_accum has no CPU counterpart: accumulation here is always fp32.)"""
        weight_scale = self.weight_scale if self.scaling == "tensorwise" else self.weight_scale.t()  # (N, 1)
        y = (xq.float() * xs) @ (self.weight.float() * weight_scale).t()
        if bias is not None:
            y = y + bias.float()
        return y.to(self.out_dtype)

    @torch.no_grad()
    def freeze(self) -> None:
        """End calibration: static scale = headroom x observed amax."""
        self.input_scale.copy_((self.input_amax * CALIBRATION_HEADROOM).clamp_min(1e-12) / E4M3_MAX)
        self.calibrating = False


def calibrated_linears(model: torch.nn.Module) -> list[Fp8Linear]:
    return [m for m in model.modules() if isinstance(m, Fp8Linear) and m.activations == "calibrated"]


@torch.no_grad()
def start_calibration(model: torch.nn.Module) -> int:
    """Forget the static scales of `model`'s calibrated linears and measure again from the next call (call at
    the start of each sampling run: a new prompt or resolution must not reuse old scales). Returns how many."""
    linears = calibrated_linears(model)
    for linear in linears:
        linear.input_amax.zero_()
        linear.calibrating = True
    return len(linears)


@torch.no_grad()
def freeze_calibration(model: torch.nn.Module) -> int:
    """Freeze the static activation scales from what the calls since `start_calibration` saw. Refuses when
    a linear saw no (non-zero) input, since its frozen scale would silence it. Returns how many froze."""
    linears = [m for m in calibrated_linears(model) if m.calibrating]
    if not linears:
        return 0
    unseen = [i for i, seen in enumerate(torch.stack([m.input_amax for m in linears]).gt(0).tolist()) if not seen]
    if unseen:
        raise RuntimeError(f"fp8 calibration: {len(unseen)} of {len(linears)} linears saw no input before freezing; "
                           "run at least one full model call after start_calibration")
    for linear in linears:
        linear.freeze()
    return len(linears)


class Fp8WeightLinear(torch.nn.Module):
    """fp8 storage only, for the modulation linears: one input row per image, so the product is memory-bound
    and fp8 tensor cores would not help, but keeping the weight in fp8 halves its memory."""

    def __init__(self, linear: torch.nn.Linear, out_dtype: torch.dtype,
                 work_device: torch.device | None = None) -> None:
        super().__init__()
        home = linear.weight.device
        weight, scale = quantize_rows(linear.weight.detach().to(work_device or home))
        self.weight = torch.nn.Parameter(weight.to(home), requires_grad=False)
        self.register_buffer("weight_scale", scale.to(home).contiguous())  # (N, 1)
        self.bias = None if linear.bias is None else torch.nn.Parameter(
            linear.bias.detach().to(out_dtype), requires_grad=False)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight.to(self.out_dtype) * self.weight_scale.to(self.out_dtype))
        return torch.nn.functional.linear(x.to(self.out_dtype), weight, self.bias)


def fuse_attention_projections(transformer: torch.nn.Module) -> None:
    """Fuse q/k/v (and the text stream's q/k/v) into one linear each with diffusers' own fusion, then drop
    the separate copies so the weights are not held twice."""
    for module in transformer.modules():
        if hasattr(module, "fuse_projections") and getattr(module, "_supports_qkv_fusion", False):
            module.fuse_projections()
            for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                if isinstance(getattr(module, name, None), torch.nn.Linear):
                    delattr(module, name)


def _replace(block: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, module)


def quantize_transformer_linears(transformer: torch.nn.Module, out_dtype: torch.dtype, fuse_qkv: bool = True,
                                 scaling: str = "rowwise", fast_accum: bool = False,
                                 activations: str = "dynamic", work_device: torch.device | None = None) -> int:
    """Swap the linears of the repeated blocks for fp8 ones: token-wise products get fp8 matmul
    (Fp8Linear with `scaling`), the per-image modulation linears fp8 storage (Fp8WeightLinear). With
    `fuse_qkv`, q/k/v are first fused into one projection (diffusers' fused path), so one activation
    quantisation feeds one larger GEMM. `fast_accum` and `activations` go to every Fp8Linear. With
    `work_device`, each weight is quantised there and the fp8 result goes back where the weight lives (block
    offload keeps weights in CPU memory, and quantising 12B weights on the CPU takes tens of seconds). Returns
    how many linears were swapped."""
    check_scaling(scaling)
    check_activations(activations)
    if fuse_qkv:
        fuse_attention_projections(transformer)
    swapped = 0
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for block in blocks:
            for name, module in list(block.named_modules()):
                if not isinstance(module, torch.nn.Linear):
                    continue
                if "norm" in name:
                    swapped_in = Fp8WeightLinear(module, out_dtype, work_device)
                else:
                    swapped_in = Fp8Linear(module, out_dtype, scaling, fast_accum, activations, work_device)
                _replace(block, name, swapped_in)
                swapped += 1
    return swapped
