"""First-block step cache as diffusers block hooks on the transformer the sampler calls.

The first double block always runs; when reusing the other blocks' summed residual from the last full step is
estimated to change the final latent by little, the other blocks are skipped and that residual is added instead
(the idea of ParaAttention's First-Block Cache, with the error accounting of TeaCache/EasyCache: consecutive steps
of a rectified-flow sampler change slowly in the middle of the schedule). diffusers' own `apply_first_block_cache`
does the same skip, but it reuses the residual *including* the ControlNet additions diffusers' forward makes
between blocks, so with a ControlNet the skipped step adds them twice; it also has no step window, no cap on
consecutive reuses and a fixed per-step threshold. These hooks keep diffusers' forward and its hook registry and
differ there: the reused residual is the blocks' own (ControlNet residuals of the current step are still added
by the forward), reuse happens only inside a window of sampling progress and at most `max_consecutive` times in a
row, the state is kept per prompt stream (positive / negative), and the decision is an error estimate:

    estimate_i = rate * change_i * |sigma_prev - sigma_i|,  reuse while  sum of estimates since the full step < threshold

- `change_i` is the first block's image-residual change since the last full step, mean|r - r_full| / mean|r_full|;
- `rate` is how the deep blocks' residual changed relative to the first block's between the last two full steps
  (their ratio of relative changes; 1 until two full steps were seen), so the estimate is of the deep residual
  the reuse gets wrong, calibrated on this model, prompt and stage of the schedule;
- the step size `|sigma_prev - sigma_i|` (the previous evaluation's sigma to this one's, from the transformer's
  own `timestep` input) turns a velocity error into the latent error it causes: an Euler step moves the latent by
  the step size times the velocity. The sum therefore estimates the final latent's relative change. (With fewer
  steps the same threshold still reuses less: at 12 steps 0.01 reused 14 % against 50 % at 28 steps, on the
  embedded model; docs/performance.md.)

Why not the previous rule (reuse while `change_i` < threshold): on the trained embedded model the first block
changes by 6-11 % per step at 28 steps, so every threshold under 0.06 reused nothing and reuse jumped to 36 % at
0.1, while a run of reuses with each step just under the threshold piled up error (5.5 % worst final-latent
error at 36 % reuse against 2.9 % for core's EasyCache at 26 %); measured in
docs/bench/embedded_step_cache_v1_validation_2026-12-01.json.

The decision runs in eager Python around each block, so it composes with blocks compiled by `compile_blocks`
(their compiled forward is what the hooks call) and with weight-fused LoRAs. The sampler says which step and
stream each evaluation belongs to (`StepCacheState.evaluation`): progress is never inferred from sigma; sigma is
read only as the step size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..flux_sampler.progress import StepPosition

HOOK_NAME = "fluxworks_step_cache"
DEFAULT_THRESHOLD = 0.01  # chosen on the validation captions, docs/performance.md "Step cache"


@dataclass(frozen=True)
class StepCacheConfig:
    """Reuse while the estimated relative change of the final latent that the reuses since the last full step add
    (see the module docstring) stays below `threshold`, only for progress in [start, end], at most
    `max_consecutive` times in a row. 0 switches reuse off."""

    threshold: float = DEFAULT_THRESHOLD
    start_percent: float = 0.1
    end_percent: float = 0.9
    max_consecutive: int = 3  # force a full step after this many reuses, so errors cannot pile up

    def __post_init__(self) -> None:
        if not self.threshold >= 0:  # also rejects NaN
            raise ValueError(f"cache threshold must be >= 0, got {self.threshold}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"cache window must satisfy 0 <= start <= end <= 1, got "
                             f"{self.start_percent}..{self.end_percent}")
        if self.max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {self.max_consecutive}")


@dataclass
class _Stream:
    first_residual: torch.Tensor | None = None  # first block's image residual at the last full step
    rest_residual: torch.Tensor | None = None  # the other blocks' own summed residual at that step
    consecutive: int = 0
    rate: float = 1.0  # deep-residual change per first-block change, measured between the last two full steps
    spent: float = 0.0  # summed error estimates of the reuses since the last full step
    sigma: float | None = None  # sigma of this stream's previous evaluation


@dataclass
class _Evaluation:
    """What the hooks need to know about the transformer call in progress."""

    stream: str
    position: StepPosition
    skipping: bool = False
    with_control: bool = False
    step_size: float = 0.0  # |sigma_prev - sigma| of this evaluation
    change: float | None = None  # first-block change since the last full step (None: nothing to compare)
    first_out: torch.Tensor | None = None  # first block's image output (full steps)
    first_residual: torch.Tensor | None = None
    summed: torch.Tensor | None = None  # running sum of block residuals (full steps with ControlNets)


@dataclass
class StepCacheState:
    """One sampling run's cache; `hits` and `misses` count skipped and full block stacks, `changes` the measured
    first-block change of every evaluation compared inside the window, `estimates` the error estimate of each,
    `reused_steps` the step indices where any stream reused."""

    config: StepCacheConfig
    streams: dict[str, _Stream] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    changes: list[float] = field(default_factory=list)
    estimates: list[float] = field(default_factory=list)
    reused_steps: list[int] = field(default_factory=list)
    on_skip: Callable[[], None] | None = None  # told when the rest of a pass is skipped (block offload)
    current: _Evaluation | None = None

    def reset(self) -> None:
        self.streams.clear()
        self.hits = self.misses = 0
        self.changes.clear()
        self.estimates.clear()
        self.reused_steps.clear()
        self.current = None

    @contextlib.contextmanager
    def evaluation(self, position: StepPosition, stream: str) -> Iterator[None]:
        """Mark the transformer call made inside as step `position` of prompt stream `stream`."""
        self.current = _Evaluation(stream, position)
        try:
            yield
        finally:
            self.current = None

    def _stream(self) -> tuple[_Evaluation, _Stream]:
        if self.current is None:
            raise RuntimeError("the step cache needs each transformer call inside StepCacheState.evaluation(...)")
        return self.current, self.streams.setdefault(self.current.stream, _Stream())

    def note_sigma(self, sigma: float) -> None:
        """The evaluation's sigma (the transformer's `timestep` input): its step size is the distance from the
        stream's previous evaluation."""
        ev, s = self._stream()
        ev.step_size = abs(s.sigma - sigma) if s.sigma is not None else 0.0
        s.sigma = sigma

    def decide(self, first_residual: torch.Tensor) -> bool:
        """Whether this evaluation reuses the rest of the network; records the decision."""
        ev, s = self._stream()
        cfg = self.config
        reuse = False
        if s.first_residual is not None and s.first_residual.shape == first_residual.shape:
            ev.change = _relative_change(first_residual, s.first_residual)
        if (ev.change is not None and s.rest_residual is not None and cfg.threshold > 0
                and ev.position.within(cfg.start_percent, cfg.end_percent) and s.consecutive < cfg.max_consecutive):
            estimate = s.rate * ev.change * ev.step_size
            self.changes.append(ev.change)
            self.estimates.append(estimate)
            reuse = s.spent + estimate < cfg.threshold
            if reuse:
                s.spent += estimate
        ev.skipping = reuse
        if reuse:
            s.consecutive += 1
            self.hits += 1
            if not self.reused_steps or self.reused_steps[-1] != ev.position.index:
                self.reused_steps.append(ev.position.index)
        return reuse

    def record_full(self, first_residual: torch.Tensor, rest_residual: torch.Tensor) -> None:
        """A full evaluation: recalibrate the rate from the change since the last full step, then keep its
        residuals as the new reference."""
        ev, s = self._stream()
        if ev.change is not None and s.rest_residual is not None and s.rest_residual.shape == rest_residual.shape:
            s.rate = _relative_change(rest_residual, s.rest_residual) / max(ev.change, 1e-12)
        s.first_residual, s.rest_residual, s.consecutive, s.spent = first_residual, rest_residual, 0, 0.0
        self.misses += 1


def _relative_change(current: torch.Tensor, reference: torch.Tensor) -> float:
    """mean|current - reference| / mean|reference| over the whole batch (one decision per batch)."""
    return float((current - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12))


class _EntryHook(ModelHook):
    """On the transformer: notes whether this call carries ControlNet residuals, and its sigma."""

    def __init__(self, state: StepCacheState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        ev, _ = self.state._stream()
        ev.with_control = (kwargs.get("controlnet_block_samples") is not None
                           or kwargs.get("controlnet_single_block_samples") is not None)
        timestep = kwargs.get("timestep")
        if timestep is None:
            raise ValueError("the step cache needs the transformer called with timestep= (diffusers' keyword)")
        self.state.note_sigma(float(timestep.flatten()[0]))
        return args, kwargs


class _FirstBlockHook(ModelHook):
    def __init__(self, state: StepCacheState) -> None:
        super().__init__()
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        hidden = kwargs["hidden_states"]
        text_out, out = self.fn_ref.original_forward(*args, **kwargs)
        first_residual = out - hidden
        if self.state.decide(first_residual):
            if self.state.on_skip is not None:
                self.state.on_skip()
            _, s = self.state._stream()
            return text_out, out + s.rest_residual
        ev, _ = self.state._stream()
        ev.first_out, ev.first_residual = out, first_residual
        ev.summed = torch.zeros_like(out) if ev.with_control else None
        return text_out, out


class _BlockHook(ModelHook):
    """Every later block: passes its inputs through on a reused step; on a full step, the last block records the
    blocks' own residual (with ControlNets, summed block by block so the ControlNet additions stay out of it)."""

    def __init__(self, state: StepCacheState, last: bool) -> None:
        super().__init__()
        self.state, self.last = state, last

    def new_forward(self, module, *args, **kwargs):
        ev, _ = self.state._stream()
        if ev.skipping:
            return kwargs["encoder_hidden_states"], kwargs["hidden_states"]
        text_out, out = self.fn_ref.original_forward(*args, **kwargs)
        if ev.summed is not None:
            ev.summed += out - kwargs["hidden_states"]
        if self.last:
            rest = ev.summed if ev.summed is not None else out - ev.first_out
            self.state.record_full(ev.first_residual, rest)
            ev.first_out = ev.first_residual = ev.summed = None
        return text_out, out


def attach_step_cache(transformer: torch.nn.Module, config: StepCacheConfig) -> StepCacheState | None:
    """Register the cache hooks on `transformer` (a prepared clone: the loaded model is never hooked). Returns the
    run state, or None when the model has fewer than two blocks (nothing to skip)."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    if len(blocks) < 2 or len(transformer.transformer_blocks) == 0:
        return None
    state = StepCacheState(config)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_EntryHook(state), HOOK_NAME)
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(_FirstBlockHook(state), HOOK_NAME)
    for index, block in enumerate(blocks[1:], start=1):
        hook = _BlockHook(state, last=index == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, HOOK_NAME)
    return state
