"""Where on the noise path (sigma in (0, 1]) each training sample is taken.

- "uniform" and "logit_normal" are diffusers' `train_dreambooth_lora_flux.py` (`--weighting_scheme none` /
  `logit_normal`): u from `compute_density_for_timestep_sampling`, then index `int(u * 1000)` into the timesteps of a
  `FlowMatchEulerDiscreteScheduler` with FLUX.1's scheduler config (dynamic shifting on, so the training grid is
  unshifted: sigma = 1 - index / 1000).
- "flux_shift" is kohya sd-scripts' `--timestep_sampling flux_shift`: t = sigmoid(N(mean, std)) shifted by the
  resolution-dependent mu the FLUX.1 sampler uses at this image size (BFL `time_shift`, `flux_sampler.schedule`), so
  training sees the noise levels sampling spends its steps on.
"""

from __future__ import annotations

import torch

from ..flux_sampler.schedule import calculate_mu, image_seq_len, time_shift

TIMESTEP_SAMPLING = ("flux_shift", "logit_normal", "uniform")
NUM_TRAIN_TIMESTEPS = 1000  # FLUX.1's scheduler_config.json
_DENSITY = {"uniform": "none", "logit_normal": "logit_normal"}  # ours -> the script's --weighting_scheme


def scheduler_sigmas(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The training grid of the script's scheduler copy: (num_train_timesteps,) sigmas from 1 down to 1/N."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, use_dynamic_shifting=True)
    return scheduler.sigmas[:num_train_timesteps].float()


def sample_sigmas(mode: str, batch: int, latent_hw: tuple[int, int], generator: torch.Generator,
                  logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """(batch,) float32 sigmas on the generator's device, drawn as `mode` (one of TIMESTEP_SAMPLING) says."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    device = generator.device
    if mode == "flux_shift":
        u = torch.sigmoid(torch.normal(logit_mean, logit_std, (batch,), generator=generator, device=device))
        return time_shift(calculate_mu(image_seq_len(*latent_hw)), 1.0, u).float()
    if mode not in _DENSITY:
        raise ValueError(f"timestep sampling {mode!r} is not one of {TIMESTEP_SAMPLING}")
    u = compute_density_for_timestep_sampling(_DENSITY[mode], batch, logit_mean, logit_std, device=device,
                                              generator=generator)
    indices = (u * NUM_TRAIN_TIMESTEPS).long()
    return scheduler_sigmas().to(device)[indices.clamp(max=NUM_TRAIN_TIMESTEPS - 1)]
