"""Rectified-flow training of the transformer with the text encoders, then guidance distillation.

Stage 1 (flow): x_t = sigma * noise + (1 - sigma) * x0, the model predicts v = noise - x0 (Liu et al. 2022;
SD3, Esser et al. 2024), sigma logit-normal then shifted as the sampler shifts it at this resolution; the
prompt is dropped (empty caption) 10 % of the time, and the guidance input is held at 1.
Stage 2 (guidance distillation, as FLUX.1 [dev] is distilled; Meng et al. 2023): a frozen copy of the
stage-1 model is the teacher, and the student learns v_u + g (v_c - v_u) at a random guidance g that it
receives through its guidance embedding, so one evaluation per step gives classifier-free guidance.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fluxworks.flux_sampler.schedule import calculate_mu, image_seq_len, time_shift

from .flux_model import velocity
from .stage import StageClock, cosine_lr
from .text_encoders import CaptionTokens, encode_text

logger = logging.getLogger(__name__)

DROP_PROMPT = 0.1  # share of captions replaced by the empty prompt
T5_SHORT, T5_LONG = 128, 512  # max_sequence_length of most batches, and FLUX.1-dev's own
LONG_T5 = 0.1  # share of batches encoded at T5_LONG, so the model also works at the node's default length
GUIDANCE_RANGE = (1.0, 5.0)  # distilled guidance values the student sees


@dataclass
class FlowData:
    latents: torch.Tensor  # (N, 16, H, W) float16 model-space latents, on the training device
    t5: torch.Tensor  # (N, T5_KEPT_TOKENS) ids, on the device
    clip: torch.Tensor  # (N, 77) ids, on the device
    t5_pad: int
    empty_t5: torch.Tensor  # (T5_KEPT_TOKENS,) ids of the empty prompt
    empty_clip: torch.Tensor  # (77,)

    @classmethod
    def build(cls, latents: torch.Tensor, tokens: CaptionTokens, empty: CaptionTokens) -> FlowData:
        device = latents.device
        return cls(latents, tokens.t5.to(device), tokens.clip.to(device), tokens.t5_pad,
                   empty.t5[0].to(device), empty.clip[0].to(device))

    def batch(self, batch: int, t5_length: int, generator: torch.Generator):
        """x0 (B, 16, H, W) float32, T5 ids (B, t5_length), CLIP ids (B, 77), with prompt dropout applied."""
        device = self.latents.device
        index = torch.randint(0, len(self.latents), (batch,), device=device, generator=generator)
        drop = torch.rand(batch, device=device, generator=generator) < DROP_PROMPT
        t5 = torch.where(drop[:, None], self.empty_t5[None], self.t5[index])
        clip = torch.where(drop[:, None], self.empty_clip[None], self.clip[index])
        pad = torch.full((batch, t5_length - t5.shape[1]), self.t5_pad, dtype=t5.dtype, device=device)
        return self.latents[index].float(), torch.cat([t5, pad], 1), clip


class EMA:
    """Exponential moving average of a set of modules' parameters (float32 shadow copies)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.modules = modules
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1.0 - self.decay)

    @torch.no_grad()
    def copies(self) -> list[torch.nn.Module]:
        """Frozen deep copies of the modules holding the averaged weights."""
        out = [copy.deepcopy(m) for m in self.modules]
        params = [p for m in out for p in m.parameters()]
        for p, s in zip(params, self.shadow, strict=True):
            p.copy_(s.to(p.dtype))
        return [m.eval().requires_grad_(False) for m in out]


def sample_sigmas(batch: int, latent_hw: tuple[int, int], generator: torch.Generator,
                  device: torch.device) -> torch.Tensor:
    """Logit-normal sigmas (SD3 sec. 3.1), shifted by the resolution-dependent mu the sampler uses."""
    u = torch.sigmoid(torch.randn(batch, device=device, generator=generator))
    mu = calculate_mu(image_seq_len(*latent_hw))
    return time_shift(mu, 1.0, u.clamp(1e-4, 1 - 1e-4))


def _noised(x0: torch.Tensor, generator: torch.Generator):
    noise = torch.randn(x0.shape, device=x0.device, generator=generator)
    sigma = sample_sigmas(x0.shape[0], tuple(x0.shape[2:]), generator, x0.device)
    s = sigma[:, None, None, None]
    return s * noise + (1 - s) * x0, sigma, noise


def _t5_length(generator: torch.Generator, device: torch.device, long_share: float) -> int:
    """T5_LONG for a `long_share` of batches, else T5_SHORT: the embedded model is used at 128 tokens (its
    captions need under 48), where a step attends over 192 instead of 576 tokens, a third of the work."""
    return T5_LONG if torch.rand((), device=device, generator=generator).item() < long_share else T5_SHORT


@dataclass
class Schedule:
    steps: int
    batch: int
    lr: float
    deadline: float  # time.monotonic() value after which training stops early
    log_every: int = 100
    checkpoint_every: float = 60.0  # seconds between calls of the checkpoint callback
    long_t5: float = LONG_T5  # share of batches with T5_LONG tokens


def _optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _attention_kernels():
    """Flash attention (the transformer's unmasked attention) or plain math; never the memory-efficient
    kernel, whose backward with a float mask crashed here with an illegal memory access."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])


def _finish(name: str, step: int, clock: StageClock) -> None:
    logger.info("%s: %d of %d steps in %.1f s%s", name, step, clock.steps, clock.elapsed(),
                "" if step >= clock.steps else " (stopped by the time limit)")


def _train_loop(name: str, params: list[torch.Tensor], ema: EMA, plan: Schedule, warmup: int,
                loss_at: Callable[[], torch.Tensor], checkpoint: Callable[[EMA], None] | None) -> EMA:
    """The loop both stages share: cosine learning rate (annealed by elapsed time when the deadline comes
    first), one clipped AdamW step on `loss_at()`, EMA update, periodic log line and checkpoint."""
    opt = _optimizer(params, plan.lr)
    clock = StageClock(plan.steps, plan.deadline)
    last_checkpoint = time.monotonic()
    step = 0
    while not clock.done(step):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(clock.effective_step(step), plan.steps, plan.lr,
                                    warmup=min(warmup, plan.steps // 10 + 1))
        loss = loss_at()
        opt.zero_grad(set_to_none=True)
        with _attention_kernels():
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        if step % plan.log_every == 0:
            logger.info("%s step %d/%d loss %.4f (%.1f s)", name, step, plan.steps, loss.item(), clock.elapsed())
        if checkpoint is not None and time.monotonic() - last_checkpoint > plan.checkpoint_every:
            checkpoint(ema)
            last_checkpoint = time.monotonic()
        step += 1
    _finish(name, step, clock)
    return ema


def train_flow(flux, t5, clip, data: FlowData, plan: Schedule, seed: int,
               checkpoint: Callable[[EMA], None] | None = None) -> EMA:
    """Stage 1: joint rectified-flow training of transformer and text encoders; returns their EMA."""
    device = data.latents.device
    modules = [flux, t5, clip]
    for m in modules:
        m.train().requires_grad_(True)
    generator = torch.Generator(device).manual_seed(seed)
    ones = torch.ones(plan.batch, device=device)

    def loss_at() -> torch.Tensor:
        x0, t5_ids, clip_ids = data.batch(plan.batch, _t5_length(generator, device, plan.long_t5), generator)
        xt, sigma, noise = _noised(x0, generator)
        with _autocast(device), _attention_kernels():
            txt, pooled = encode_text(t5, clip, t5_ids, clip_ids)
            v = velocity(flux, xt, sigma, txt, pooled, ones)
        return F.mse_loss(v.float(), noise - x0)

    params = [p for m in modules for p in m.parameters()]
    return _train_loop("flow", params, EMA(modules, decay=0.999), plan, 300, loss_at, checkpoint)


def distill_guidance(teacher, t5, clip, data: FlowData, plan: Schedule, seed: int,
                     checkpoint: Callable[[EMA], None] | None = None) -> EMA:
    """Stage 2: a copy of the frozen `teacher` learns the teacher's CFG output at guidance g in
    GUIDANCE_RANGE from one evaluation; the text encoders stay frozen. Returns the student's EMA."""
    device = data.latents.device
    teacher.eval().requires_grad_(False)
    t5.eval().requires_grad_(False)
    clip.eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    generator = torch.Generator(device).manual_seed(seed)
    empty_clip = data.empty_clip[None].expand(plan.batch, -1)
    ones = torch.ones(2 * plan.batch, device=device)
    low, high = GUIDANCE_RANGE

    def loss_at() -> torch.Tensor:
        length = _t5_length(generator, device, plan.long_t5)
        x0, t5_ids, clip_ids = data.batch(plan.batch, length, generator)
        xt, sigma, _ = _noised(x0, generator)
        g = low + (high - low) * torch.rand(plan.batch, device=device, generator=generator)
        empty_t5 = torch.full((plan.batch, length), data.t5_pad, dtype=t5_ids.dtype, device=device)
        empty_t5[:, : data.empty_t5.shape[0]] = data.empty_t5
        with torch.no_grad(), _autocast(device), _attention_kernels():
            txt, pooled = encode_text(t5, clip, torch.cat([t5_ids, empty_t5]), torch.cat([clip_ids, empty_clip]))
            v_c, v_u = velocity(teacher, torch.cat([xt, xt]), torch.cat([sigma, sigma]), txt, pooled,
                                ones).float().chunk(2)
            target = v_u + g[:, None, None, None] * (v_c - v_u)
        with _autocast(device), _attention_kernels():
            v = velocity(student, xt, sigma, txt[: plan.batch], pooled[: plan.batch], g)
        return F.mse_loss(v.float(), target)

    return _train_loop("distill", list(student.parameters()), EMA([student], decay=0.998), plan, 100, loss_at,
                       checkpoint)
