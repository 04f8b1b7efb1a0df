"""fp8 matmul linears: weights stored as float8_e4m3fn with one scale per output row, activations quantised
per token on the fly, product by `torch._scaled_mm` on GPUs with fp8 tensor cores (Ada, Hopper, newer).
Elsewhere the same quantised arithmetic is emulated in float32, so CPU tests check the same function."""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> fp8 values and (N, 1) float32 scales with x ≈ values * scales (per-row absmax)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def fp8_matmul_supported(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) >= (8, 9)


class Fp8Linear(torch.nn.Module):
    """Drop-in for nn.Linear (inference): y = (q(x) s_x) (q(W) s_W)^T + b, computed in fp8 where possible."""

    def __init__(self, linear: torch.nn.Linear, out_dtype: torch.dtype) -> None:
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())  # (1, N)
        self.bias = None if linear.bias is None else torch.nn.Parameter(
            linear.bias.detach().to(out_dtype), requires_grad=False)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = quantize_rows(x2)
        if fp8_matmul_supported(x.device):
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale,
                                 out_dtype=self.out_dtype)
        else:
            y = ((xq.float() * xs) @ (self.weight.float() * self.weight_scale.t()).t()).to(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Fp8WeightLinear(torch.nn.Module):
    """fp8 storage only, for the modulation linears: one input row per image, so the product is memory-bound
    and fp8 tensor cores would not help, but keeping the weight in fp8 halves its memory."""

    def __init__(self, linear: torch.nn.Linear, out_dtype: torch.dtype) -> None:
        super().__init__()
        weight, scale = quantize_rows(linear.weight.detach())
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale.contiguous())  # (N, 1)
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


def quantize_transformer_linears(transformer: torch.nn.Module, out_dtype: torch.dtype, fuse_qkv: bool = True) -> int:
    """Swap the linears of the repeated blocks for fp8 ones: token-wise products get fp8 matmul
    (Fp8Linear), the per-image modulation linears fp8 storage (Fp8WeightLinear). With `fuse_qkv`, q/k/v are
    first fused into one projection (diffusers' fused path), so one activation quantisation feeds one
    larger GEMM. Returns how many linears were swapped."""
    if fuse_qkv:
        fuse_attention_projections(transformer)
    swapped = 0
    for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
        for block in blocks:
            for name, module in list(block.named_modules()):
                if not isinstance(module, torch.nn.Linear):
                    continue
                wrapper = Fp8WeightLinear if "norm" in name else Fp8Linear
                _replace(block, name, wrapper(module, out_dtype))
                swapped += 1
    return swapped
