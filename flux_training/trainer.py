"""The LoRA training loop: the flow-matching step of diffusers' `train_dreambooth_lora_flux.py`, its optimiser
and learning-rate schedules, gradient accumulation and clipping, checkpoints and resuming.

One step, as the script computes it (with `--weighting_scheme none`, i.e. an unweighted loss): x_t = (1 - sigma) x0
+ sigma noise, the transformer gets x_t packed into 2x2 patches, `timestep` = sigma and the distilled guidance value
(models with a guidance embedding only), and the loss is the mean squared error of its unpacked output against the
velocity noise - x0. The optimiser steps every `gradient_accumulation` micro-batches after clipping the gradient norm
to `max_grad_norm`. A training state (step, optimiser moments, generator) is saved next to the LoRA file as
`<name>.state.safetensors`, so `resume` continues where a run stopped, interrupted or not.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from ..flux_sampler.latents import make_img_ids, pack, unpack
from .data import CachedDataset, TrainingBatch
from .lora import LORA_LAYERS, lora_config, save_lora, training_adapter
from .timesteps import TIMESTEP_SAMPLING, sample_sigmas

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit")
STATE_SUFFIX = ".state.safetensors"


@dataclass(frozen=True)
class TrainSettings:
    """What a run is; defaults are the script's and kohya's documented Flux settings (rank 16, lr 1e-4)."""

    steps: int = 500
    rank: int = 16
    alpha: float = 16.0
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"
    batch_size: int = 1
    gradient_accumulation: int = 1
    gradient_checkpointing: bool = False
    timestep_sampling: str = "flux_shift"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    guidance: float = 1.0  # distilled guidance the model gets while training (dev); kohya's --guidance_scale 1.0
    lora_layers: str = "attention_mlp"
    seed: int = 0
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-4  # the script's --adam_weight_decay
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def check(self) -> None:
        """ValueError naming the setting, its value and what it may be."""
        positive = {"steps": self.steps, "rank": self.rank, "batch_size": self.batch_size,
                    "gradient_accumulation": self.gradient_accumulation}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive (the LoRA scale is alpha / rank), got {self.alpha!r}")
        choices = {"lr_schedule": (self.lr_schedule, LR_SCHEDULES), "optimizer": (self.optimizer, OPTIMIZERS),
                   "timestep_sampling": (self.timestep_sampling, TIMESTEP_SAMPLING)}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name} {value!r} is not one of {allowed}")
        if self.lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        if "," not in self.lora_layers and self.lora_layers not in LORA_LAYERS:
            raise ValueError(f"lora_layers {self.lora_layers!r}: use one of {LORA_LAYERS} or a comma-separated list")


def transformer_inputs(x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                       guidance: float | None) -> dict[str, torch.Tensor | None]:
    """diffusers keyword inputs for (B, 16, H, W) latents at per-sample `sigma` (the FLUX.1 sampler's layout)."""
    b, _, h, w = x.shape
    return dict(hidden_states=pack(x), encoder_hidden_states=text, pooled_projections=pooled, timestep=sigma,
                guidance=None if guidance is None else torch.full((b,), guidance, device=x.device),
                txt_ids=torch.zeros(text.shape[1], 3, device=x.device),
                img_ids=make_img_ids(h, w, x.device, torch.float32))


def flow_prediction(transformer: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
                    pooled: torch.Tensor, guidance: float | None) -> torch.Tensor:
    """The transformer's velocity (B, 16, H, W) at noisy latents x, computed in the transformer's dtype."""
    dtype = next(transformer.parameters()).dtype
    inputs = transformer_inputs(x.to(dtype), sigma.to(dtype), text.to(dtype), pooled.to(dtype), guidance)
    return unpack(transformer(**inputs, return_dict=False)[0], *x.shape[2:])


def flow_matching_loss(transformer: torch.nn.Module, batch: TrainingBatch, noise: torch.Tensor, sigma: torch.Tensor,
                       guidance: float | None) -> torch.Tensor:
    """MSE between the predicted velocity at x_t = (1 - sigma) x0 + sigma noise and the target noise - x0."""
    x0 = batch.latents.float()
    s = sigma.float()[:, None, None, None]
    prediction = flow_prediction(transformer, (1.0 - s) * x0 + s * noise, sigma, batch.text, batch.pooled, guidance)
    return F.mse_loss(prediction.float(), noise - x0)


def make_optimizer(params: list[torch.Tensor], settings: TrainSettings) -> torch.optim.Optimizer:
    """torch AdamW, or bitsandbytes' AdamW8bit (ImportError naming the package when it is not installed)."""
    kwargs = dict(lr=settings.learning_rate, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)
    if settings.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError("optimizer adamw8bit needs the bitsandbytes package (pip install bitsandbytes); "
                              "or choose adamw") from exc
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_lr_schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings):
    """diffusers' `get_scheduler` with the script's --lr_scheduler / --lr_warmup_steps, counted in optimiser steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(settings.lr_schedule, optimizer, num_warmup_steps=settings.lr_warmup_steps,
                         num_training_steps=settings.steps)


@dataclass
class StepReport:
    step: int  # optimiser steps done
    steps: int
    loss: float  # mean over the step's micro-batches
    lr: float


class TrainingInterrupted(Exception):
    """Raised by a progress callback to stop training; the trainer saves a checkpoint first."""


class LoraTrainer:
    """Trains a LoRA on a diffusers FLUX.1 transformer. Use as a context manager: the adapter exists inside it and
    is removed on exit, leaving the transformer as it came."""

    def __init__(self, transformer: torch.nn.Module, settings: TrainSettings, device: torch.device,
                 resume: str | None = None) -> None:
        settings.check()
        self.transformer = transformer
        self.settings = settings
        self.device = device
        self.guidance = settings.guidance if transformer.config.guidance_embeds else None
        self.config = lora_config(transformer, settings.rank, settings.alpha, settings.lora_layers)
        self.resume = resume
        self.step = 0
        self.losses: list[float] = []
        self._adapter = None

    def __enter__(self) -> LoraTrainer:
        self._adapter = training_adapter(self.transformer, self.config, self.resume)
        self.params = self._adapter.__enter__()
        self.generator = torch.Generator(self.device).manual_seed(self.settings.seed)
        self.optimizer = make_optimizer(self.params, self.settings)
        self.lr_schedule = make_lr_schedule(self.optimizer, self.settings)
        if self.resume is not None and os.path.isfile(state_path(self.resume)):
            self._load_state(state_path(self.resume))
        self._checkpointing = getattr(self.transformer, "gradient_checkpointing", False)
        if self.settings.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.transformer.train()
        return self

    def __exit__(self, *exc) -> None:
        self.transformer.eval()
        if self.settings.gradient_checkpointing and not self._checkpointing:
            self.transformer.disable_gradient_checkpointing()
        self._adapter.__exit__(*exc)

    def noise_and_sigma(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian noise like x0 and per-sample sigmas, from the trainer's generator."""
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        sigma = sample_sigmas(self.settings.timestep_sampling, x0.shape[0], tuple(x0.shape[2:]), self.generator,
                              self.settings.logit_mean, self.settings.logit_std)
        return noise, sigma

    def dataset_loss(self, dataset: CachedDataset, prior: CachedDataset | None = None,
                     prior_weight: float = 1.0) -> Callable[[], torch.Tensor]:
        """The loss of one micro-batch drawn from `dataset` (the usual `loss_fn` of `train`). With `prior` (DreamBooth
        prior preservation: the base model's own pictures of the class), a batch of it is added at `prior_weight`, as
        the script's --with_prior_preservation adds its class images' loss."""

        def one(data: CachedDataset) -> torch.Tensor:
            batch = data.sample(self.settings.batch_size, self.generator)
            noise, sigma = self.noise_and_sigma(batch.latents)
            return flow_matching_loss(self.transformer, batch, noise, sigma, self.guidance)

        def loss() -> torch.Tensor:
            return one(dataset) if prior is None else one(dataset) + prior_weight * one(prior)

        return loss

    def optimiser_step(self, loss_fn: Callable[[], torch.Tensor]) -> float:
        """`gradient_accumulation` micro-batches, clip, one optimiser and schedule step; the mean loss."""
        total = 0.0
        accumulation = self.settings.gradient_accumulation
        for _ in range(accumulation):
            loss = loss_fn()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss became {loss.item()} at step {self.step + 1}: lower the "
                                         f"learning rate (now {self.settings.learning_rate:g})")
            (loss / accumulation).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(total / accumulation)
        return self.losses[-1]

    def train(self, loss_fn: Callable[[], torch.Tensor], progress: Callable[[StepReport], None] | None = None,
              checkpoint: str | None = None, save_every: int = 0) -> list[float]:
        """Run to `settings.steps`. `progress` is called after every step and may raise (ComfyUI's interrupt,
        TrainingInterrupted, a time limit): with `checkpoint` set, the LoRA and state are saved there before the
        exception propagates. Also saved every `save_every` steps (0 = never) and at the end."""
        try:
            while self.step < self.settings.steps:
                loss = self.optimiser_step(loss_fn)
                if progress is not None:
                    progress(StepReport(self.step, self.settings.steps, loss, self.lr_schedule.get_last_lr()[0]))
                if checkpoint is not None and save_every and self.step % save_every == 0 \
                        and self.step < self.settings.steps:
                    self.save(checkpoint)
        except BaseException:
            if checkpoint is not None and self.step > 0:
                self.save(checkpoint)
                logger.info("training stopped at step %d of %d; saved %s (resume from it)", self.step,
                            self.settings.steps, checkpoint)
            raise
        if checkpoint is not None:
            self.save(checkpoint)
        return self.losses

    def save(self, path: str) -> str:
        """The LoRA file (the script's layout) and the training state next to it."""
        save_lora(self.transformer, path)
        self._save_state(state_path(path))
        return path

    def _save_state(self, path: str) -> None:
        from safetensors.torch import save_file

        state = self.optimizer.state_dict()
        tensors = {"generator": self.generator.get_state()}
        scalars: dict[str, dict[str, float]] = {}
        for index, entry in state["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.numel() > 1:
                    tensors[f"optimizer.{index}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(index), {})[key] = float(value)
        meta = {"step": self.step, "losses": self.losses, "scalars": scalars,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]],
                "lr_schedule": self.lr_schedule.state_dict(), "settings": asdict(self.settings)}
        tmp = path + ".tmp"
        save_file(tensors, tmp, metadata={"fluxworks_training_state": json.dumps(meta)})
        os.replace(tmp, path)

    def _load_state(self, path: str) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fluxworks_training_state", "{}"))
        if not meta:
            raise ValueError(f"{path} is not a FluxWorks training state (no fluxworks_training_state metadata)")
        saved = meta["settings"]
        for name in ("rank", "lora_layers", "optimizer"):
            if saved[name] != getattr(self.settings, name):
                raise ValueError(f"{path} was trained with {name}={saved[name]!r}; resuming needs the same value "
                                 f"(got {getattr(self.settings, name)!r})")
        tensors = load_file(path)
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.to(self.device)
        for index, entry in meta["scalars"].items():
            state.setdefault(int(index), {}).update({k: torch.tensor(v) for k, v in entry.items()})
        groups = [{**g, "params": own["params"]} for g, own in
                  zip(meta["param_groups"], self.optimizer.state_dict()["param_groups"], strict=True)]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.lr_schedule.load_state_dict(meta["lr_schedule"])
        self.generator.set_state(tensors["generator"])
        self.step = int(meta["step"])
        self.losses = list(meta["losses"])
        logger.info("resumed from %s at step %d", path, self.step)


def state_path(lora_path: str) -> str:
    """Where the training state of a LoRA file lives."""
    return (lora_path[: -len(".safetensors")] if lora_path.endswith(".safetensors") else lora_path) + STATE_SUFFIX


def settings_from_dict(values: dict) -> TrainSettings:
    names = {f.name for f in fields(TrainSettings)}
    return TrainSettings(**{k: tuple(v) if k == "betas" else v for k, v in values.items() if k in names})
