"""Weight deltas of the LoRA family for Linear layers, kept factored until they are merged.

Each adapter knows its shape (out, in), computes its dense delta ΔW on request, and can hand out a subset of
its output rows, which is how a LoRA trained on a fused layer (BFL `qkv`, `linear1`) is split onto the separate
q/k/v/mlp layers of the diffusers model. Formulas: LoRA (Hu et al. 2021) ΔW = scale · up @ down; LyCORIS LoKr
ΔW = scale · (w1 ⊗ w2); LyCORIS LoHa ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Row ranges [start, stop) of an adapter's output, concatenated in this order to form a target's rows.
Rows = tuple[tuple[int, int], ...]


def _rows(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    return torch.cat([t[a:b] for a, b in rows], dim=0)


def _compose(base: Rows, rows: Rows) -> Rows:
    """Ranges of `rows` (indices into the concatenation of `base`) as ranges of the original index space."""
    out: list[tuple[int, int]] = []
    for a, b in rows:
        offset = 0
        for start, stop in base:
            lo, hi = max(a, offset), min(b, offset + stop - start)
            if lo < hi:
                out.append((start + lo - offset, start + hi - offset))
            offset += stop - start
    return tuple(out)


def _aligned(rows: Rows, block: int) -> bool:
    return all(a % block == 0 and b % block == 0 for a, b in rows)


@dataclass(frozen=True)
class LowRank:
    """ΔW = scale · up @ down, up (out, r), down (r, in)."""

    up: torch.Tensor
    down: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], self.down.shape[1])

    def delta(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        up, down = self.up.to(device, dtype), self.down.to(device, dtype)
        return (up @ down) * self.scale

    def add_to(self, weight: torch.Tensor, factor: float) -> None:
        """weight += factor · ΔW in one fused matmul, without materialising ΔW."""
        up, down = self.up.to(weight.device, weight.dtype), self.down.to(weight.device, weight.dtype)
        weight.addmm_(up, down, alpha=factor * self.scale)

    def take_rows(self, rows: Rows) -> LowRank:
        """The rows of a fused layer's LoRA that feed one split layer; rank columns that are zero there (kohya
        `split_qkv` files store a block-diagonal up) are dropped, so each part keeps only its own rank."""
        up = _rows(self.up, rows)
        used = up.abs().amax(dim=0) > 0
        if bool(used.any()) and not bool(used.all()):
            return LowRank(up[:, used].contiguous(), self.down[used].contiguous(), self.scale)
        return LowRank(up.contiguous(), self.down, self.scale)


@dataclass(frozen=True)
class Kronecker:
    """LoKr: ΔW = scale · kron(w1, w2); w2 is dense or factored as w2_a @ w2_b."""

    w1: torch.Tensor
    w2: torch.Tensor | None
    w2_a: torch.Tensor | None
    w2_b: torch.Tensor | None
    scale: float

    def _w2_shape(self) -> tuple[int, int]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        return (self.w2_a.shape[0], self.w2_b.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        out2, in2 = self._w2_shape()
        return (self.w1.shape[0] * out2, self.w1.shape[1] * in2)

    def delta(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        w2 = self.w2.to(device, dtype) if self.w2 is not None else self.w2_a.to(device, dtype) @ self.w2_b.to(
            device, dtype)
        return torch.kron(self.w1.to(device, dtype), w2) * self.scale

    def take_rows(self, rows: Rows) -> Kronecker | RowSlice:
        """Rows aligned to w2's height are rows of w1 (still a Kronecker product); other splits slice the dense
        delta when it is merged, so the factors stay small in memory."""
        out2 = self._w2_shape()[0]
        if _aligned(rows, out2):
            w1_rows = tuple((a // out2, b // out2) for a, b in rows)
            return Kronecker(_rows(self.w1, w1_rows).contiguous(), self.w2, self.w2_a, self.w2_b, self.scale)
        return RowSlice(self, rows)


@dataclass(frozen=True)
class Hadamard:
    """LoHa: ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.w1_a.shape[0], self.w1_b.shape[1])

    def delta(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        m1 = self.w1_a.to(device, dtype) @ self.w1_b.to(device, dtype)
        m2 = self.w2_a.to(device, dtype) @ self.w2_b.to(device, dtype)
        return m1 * m2 * self.scale

    def take_rows(self, rows: Rows) -> Hadamard:
        return Hadamard(_rows(self.w1_a, rows).contiguous(), self.w1_b, _rows(self.w2_a, rows).contiguous(),
                        self.w2_b, self.scale)


@dataclass(frozen=True)
class Dense:
    """A full delta (LyCORIS `diff` / `diff_b`, or a LoKr split off-grid); 2-D for weights, 1-D for biases."""

    delta_w: torch.Tensor
    scale: float = 1.0

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.delta_w.shape)

    def delta(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.delta_w.to(device, dtype) * self.scale

    def take_rows(self, rows: Rows) -> Dense:
        return Dense(_rows(self.delta_w, rows).contiguous(), self.scale)


@dataclass(frozen=True)
class RowSlice:
    """Some rows of another adapter's delta, computed at merge time."""

    inner: Kronecker
    rows: Rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (sum(b - a for a, b in self.rows), self.inner.shape[1])

    def delta(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return _rows(self.inner.delta(device, dtype), self.rows)

    def take_rows(self, rows: Rows) -> RowSlice:
        return RowSlice(self.inner, _compose(self.rows, rows))


Adapter = LowRank | Kronecker | Hadamard | Dense | RowSlice


def add_deltas(weight: torch.Tensor, adapters: tuple[Adapter, ...] | list[Adapter], factor: float) -> None:
    """weight += factor · Σ ΔW, in place and in weight's dtype (LoRAs through a fused matmul)."""
    for adapter in adapters:
        if tuple(adapter.shape) != tuple(weight.shape):
            raise ValueError(f"delta of shape {tuple(adapter.shape)} cannot be added to a weight of shape "
                             f"{tuple(weight.shape)}")
        if isinstance(adapter, LowRank):
            adapter.add_to(weight, factor)
        else:
            weight.add_(adapter.delta(weight.device, weight.dtype), alpha=factor)


def summed_delta(adapters: tuple[Adapter, ...] | list[Adapter], device: torch.device,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ΔW of several adapters on one layer (e.g. a file holding both `to_q` and the fused `qkv`)."""
    total = adapters[0].delta(device, dtype)
    for adapter in adapters[1:]:
        total = total + adapter.delta(device, dtype)
    return total
