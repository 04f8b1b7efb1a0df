"""Device memory a training run needs, estimated before anything is allocated, so a run that cannot fit is refused
with the numbers and the option that lowers them instead of failing with an out-of-memory error mid-run.

Parts: the base weights as stored (fp8 halves bf16); the LoRA tensors in float32 with their gradient and AdamW's two
moments (AdamW8bit: one byte per moment); and the activations autograd keeps for the backward pass. Those scale with
batch x tokens x width per block: ACTIVATION_TENSORS residual-stream-sized tensors per block (counted with
`torch.autograd.graph.saved_tensors_hooks` on the tiny test transformer, see tests/training/test_memory.py), or, with
gradient checkpointing, one per block (its input) plus one block's worth while that block is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ACTIVATION_TENSORS = 40  # residual-stream-sized tensors saved per block for backward (measured 33.6, see the test)
HEADROOM = 1.1  # allocator fragmentation and the optimiser's temporaries


@dataclass(frozen=True)
class TrainingMemory:
    weights: int
    lora: int
    activations: int

    @property
    def total(self) -> int:
        return int(HEADROOM * (self.weights + self.lora + self.activations))


def estimate_training_memory(transformer: torch.nn.Module, lora_params: int, batch: int, latent_hw: tuple[int, int],
                             text_tokens: int, compute_bytes: int, checkpointing: bool,
                             optimizer: str = "adamw") -> TrainingMemory:
    """Peak device bytes of one training step on `batch` latents of (16, *latent_hw) with `text_tokens` T5 tokens."""
    weights = sum(t.numel() * t.element_size() for t in list(transformer.parameters()) + list(transformer.buffers()))
    moments = 2 if optimizer == "adamw8bit" else 8
    lora = lora_params * (4 + 4 + moments)
    tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2) + text_tokens
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    blocks = transformer.config.num_layers + transformer.config.num_single_layers
    per_tensor = batch * tokens * width * compute_bytes
    saved = (blocks + ACTIVATION_TENSORS) if checkpointing else blocks * ACTIVATION_TENSORS
    return TrainingMemory(weights, lora, saved * per_tensor)


def lora_parameter_count(transformer: torch.nn.Module, target_modules: list[str], rank: int) -> int:
    """Trainable numbers of a LoRA of `rank` on the linears peft would match (name equal to, or ending in, a target)."""
    total = 0
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in target_modules):
            total += rank * (module.in_features + module.out_features)
    return total


def check_fits(memory: TrainingMemory, available: int, device: str, checkpointing: bool, fp8_base: bool,
               fp8_weights: int, checkpointed_activations: int) -> None:
    """MemoryError before training when the estimate exceeds `available` bytes, with the parts and what lowers them."""
    if memory.total <= available:
        return
    gib = 1024**3
    options = []
    if not checkpointing:
        options.append(f"gradient_checkpointing on (activations {memory.activations / gib:.1f} -> "
                       f"{checkpointed_activations / gib:.1f} GiB)")
    if not fp8_base:
        options.append(f"fp8_base on (weights {memory.weights / gib:.1f} -> {fp8_weights / gib:.1f} GiB)")
    options.append("a lower batch_size or resolution (activations scale with both)")
    raise MemoryError(f"training needs about {memory.total / gib:.1f} GiB on {device} (weights "
                      f"{memory.weights / gib:.1f}, LoRA + optimiser {memory.lora / gib:.2f}, activations "
                      f"{memory.activations / gib:.1f}, plus {int((HEADROOM - 1) * 100)} % headroom) but "
                      f"{available / gib:.1f} GiB are available: turn " + "; or ".join(options))
