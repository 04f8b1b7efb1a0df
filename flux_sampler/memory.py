"""How much memory a sampling run needs beyond the weights, estimated before anything is allocated, so an
impossible size or batch is refused with the numbers instead of growing the process until it is killed.

The transformer's activations scale with batch x tokens x width: every block holds the residual stream, the
q/k/v projections, the attention output and the MLP's hidden layer (4x width) at once, and diffusers' attention
backends (flash / cuDNN / memory-efficient SDPA, and the CPU's flash kernel) keep attention itself linear in the
token count. On the 12B model at 1024x1024 (4608 tokens, width 3072, bf16) the transformer peaked 0.5 GiB above
its weights on an H200 (docs/performance.md): about 18 residual-stream-sized tensors. ACTIVATION_TENSORS keeps a
margin above that. The sampler's own state is float32 latents (x, noise, velocity, denoised, the CFG pair).
"""

from __future__ import annotations

from dataclasses import dataclass

ACTIVATION_TENSORS = 24  # residual-stream-sized tensors alive at the peak of one block (measured ~18)
LATENT_COPIES = 8  # float32 latent-sized tensors the sampling loop holds at once


@dataclass(frozen=True)
class SamplingMemory:
    tokens: int
    activation_bytes: int
    latent_bytes: int

    @property
    def total(self) -> int:
        return self.activation_bytes + self.latent_bytes


def estimate_sampling_memory(batch: int, latent_height: int, latent_width: int, text_tokens: int, width: int,
                             compute_bytes: int, cfg_batch: int = 1) -> SamplingMemory:
    """Peak bytes beyond the weights for one transformer call on `batch` latents of (16, h, w) with `text_tokens`
    T5 tokens, in a transformer of residual width `width` computing with `compute_bytes` per element.
    `cfg_batch` is 1 (the negative pass runs after the positive one, never at the same time)."""
    tokens = (latent_height // 2) * (latent_width // 2) + text_tokens
    activations = ACTIVATION_TENSORS * batch * cfg_batch * tokens * width * compute_bytes
    latents = LATENT_COPIES * batch * 16 * latent_height * latent_width * 4
    return SamplingMemory(tokens, activations, latents)


def gib(nbytes: int) -> str:
    return f"{nbytes / 1024**3:.1f} GiB"
