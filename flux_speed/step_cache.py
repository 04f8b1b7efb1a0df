"""First-block step cache as diffusers block hooks on the transformer the sampler calls.

When the first double block's image residual has changed little since the last step that ran the whole network,
the other blocks are skipped and their summed residual from that step is reused (the idea of ParaAttention's
First-Block Cache and TeaCache: consecutive steps of a rectified-flow sampler change slowly in the middle of the
schedule). diffusers' own `apply_first_block_cache` does the same skip, but it reuses the residual *including*
the ControlNet additions diffusers' forward makes between blocks, so with a ControlNet the skipped step adds
them twice; it also has no step window and no cap on consecutive reuses. These hooks keep diffusers' forward and
its hook registry and differ only there: the reused residual is the blocks' own (ControlNet residuals of the
current step are still added by the forward), reuse happens only inside a window of sampling progress and at most
`max_consecutive` times in a row, and the state is kept per prompt stream (positive / negative).

The decision runs in eager Python around each block, so it composes with blocks compiled by `compile_blocks`
(their compiled forward is what the hooks call) and with weight-fused LoRAs. The sampler says which step and
stream each evaluation belongs to (`StepCacheState.evaluation`): nothing is inferred from sigma or prompt content.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..flux_sampler.progress import StepPosition

HOOK_NAME = "fluxworks_step_cache"


@dataclass(frozen=True)
class StepCacheConfig:
    """Reuse when the relative change of the first block's residual since the last full step,
    mean|r - r_full| / mean|r_full|, is below `threshold`, only for progress in [start, end], at most
    `max_consecutive` times in a row."""

    threshold: float = 0.1
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


@dataclass
class _Evaluation:
    """What the hooks need to know about the transformer call in progress."""

    stream: str
    position: StepPosition
    skipping: bool = False
    with_control: bool = False
    first_out: torch.Tensor | None = None  # first block's image output (full steps)
    first_residual: torch.Tensor | None = None
    summed: torch.Tensor | None = None  # running sum of block residuals (full steps with ControlNets)


@dataclass
class StepCacheState:
    """One sampling run's cache; `hits` and `misses` count skipped and full block stacks, `changes` the measured
    first-block change of every compared evaluation, `reused_steps` the step indices where any stream reused."""

    config: StepCacheConfig
    streams: dict[str, _Stream] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    changes: list[float] = field(default_factory=list)
    reused_steps: list[int] = field(default_factory=list)
    on_skip: Callable[[], None] | None = None  # told when the rest of a pass is skipped (block offload)
    current: _Evaluation | None = None

    def reset(self) -> None:
        self.streams.clear()
        self.hits = self.misses = 0
        self.changes.clear()
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

    def decide(self, first_residual: torch.Tensor) -> bool:
        """Whether this evaluation reuses the rest of the network; records the decision."""
        ev, s = self._stream()
        cfg = self.config
        reuse = False
        if (s.first_residual is not None and s.rest_residual is not None and cfg.threshold > 0
                and ev.position.within(cfg.start_percent, cfg.end_percent) and s.consecutive < cfg.max_consecutive
                and s.first_residual.shape == first_residual.shape):
            prev = s.first_residual
            change = float((first_residual - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12))
            self.changes.append(change)
            reuse = change < cfg.threshold
        ev.skipping = reuse
        if reuse:
            s.consecutive += 1
            self.hits += 1
            if not self.reused_steps or self.reused_steps[-1] != ev.position.index:
                self.reused_steps.append(ev.position.index)
        return reuse

    def record_full(self, first_residual: torch.Tensor, rest_residual: torch.Tensor) -> None:
        _, s = self._stream()
        s.first_residual, s.rest_residual, s.consecutive = first_residual, rest_residual, 0
        self.misses += 1


class _EntryHook(ModelHook):
    """On the transformer: notes whether this call carries ControlNet residuals."""

    def __init__(self, state: StepCacheState) -> None:
        super().__init__()
        self.state = state

    def pre_forward(self, module, *args, **kwargs):
        ev, _ = self.state._stream()
        ev.with_control = (kwargs.get("controlnet_block_samples") is not None
                           or kwargs.get("controlnet_single_block_samples") is not None)
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
