"""FluxWorks Multi-GPU workers on the CPU (gloo): two worker processes give what one process gives.

"split image": diffusers' context parallelism (Ulysses over the 2 heads of the tiny model) inside the
workers, driven through the same `sample_prepared` the one-device sampler runs; "spread batch": each worker samples
half the batch. Also: a LoRA-style weight change reaches the workers (only the changed tensors are sent), a
cancel stops every worker at a step boundary, and a worker that dies gives a clear error and a pool that
reports itself dead (the node then starts a new one)."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from devtools.tiny_models import random_flux
from fluxworks.flux_parallel.plan import ParallelPlan
from fluxworks.flux_parallel.pool import WorkerFault, WorkerPool
from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_sampler.sampling import TextConditioning
from fluxworks.flux_sampler.schedule import calculate_mu, get_sigmas
from fluxworks.flux_speed.prepare import SpeedOptions
from tests.node_path import sample_node_path

# Measured: split image 3.6e-7, spread batch 0 (same kernels per image); 3x the split figure, rounded up.
TOLERANCE = 1e-6
STEPS = 3


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def model():
    return random_flux("dev", seed=3)


def job_args(batch: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    h = w = 8  # 4x4 = 16 image tokens: divisible by 2 ranks
    pos = TextConditioning(torch.randn(1, 8, 64, generator=g), torch.randn(1, 64, generator=g))
    neg = TextConditioning(torch.randn(1, 8, 64, generator=g), torch.randn(1, 64, generator=g))
    return dict(guidance_embeds=True, positive=pos, negative=neg, latent=torch.zeros(batch, 16, h, w),
                noise=torch.randn(batch, 16, h, w, generator=g), sigmas=get_sigmas(STEPS, calculate_mu(16), 1.0),
                curve=GuidanceCurve(start_value=3.5, end_value=2.0, cfg_scale=2.0, cfg_end_percent=0.5))


def load(pool: WorkerPool, model, weights_id, patched=frozenset()):
    state = dict(model.named_parameters())

    def named(names):
        return ((n, state[n]) for n in (names if names is not None else state))

    return pool.load_weights(weights_id, model.config, torch.float32, named, frozenset(patched))


def job(args: dict) -> dict:
    return {"options": SpeedOptions(), "compute_dtype": torch.float32, "sample_args": args}


@pytest.fixture(scope="module")
def split_pool(model):
    pool = WorkerPool(ParallelPlan(("cpu", "cpu"), "split image"), cpu_threads=1)
    load(pool, model, "base")
    yield pool
    pool.close()


def test_split_image_equals_one_process(model, split_pool):
    args = job_args(batch=1)
    steps = []
    [x] = split_pool.sample([job(args)] * 2, lambda s, t: steps.append((s, t)), lambda: None)
    ref, _ = sample_node_path(model, **args)
    assert rel(x, ref) <= TOLERANCE
    assert steps == [(i, STEPS) for i in range(STEPS)]


def test_weight_change_reaches_the_workers(model, split_pool):
    """A LoRA merge changes some weights in place; only those go to the workers, and the next job uses them."""
    name = "transformer_blocks.0.attn.to_q.weight"
    param = dict(model.named_parameters())[name]
    original = param.detach().clone()
    with torch.no_grad():
        param.add_(0.05)
    try:
        assert load(split_pool, model, "lora", patched={name})
        assert not load(split_pool, model, "lora", patched={name})  # same weights: nothing sent
        args = job_args(batch=1, seed=1)
        [x] = split_pool.sample([job(args)] * 2, lambda s, t: None, lambda: None)
        ref, _ = sample_node_path(model, **args)
        assert rel(x, ref) <= TOLERANCE
    finally:
        with torch.no_grad():
            param.copy_(original)
    assert load(split_pool, model, "base", patched=frozenset())  # back: the LoRA's weights are sent again
    args = job_args(batch=1, seed=1)
    [x] = split_pool.sample([job(args)] * 2, lambda s, t: None, lambda: None)
    assert rel(x, sample_node_path(model, **args)[0]) <= TOLERANCE


def test_cancel_stops_every_worker_and_the_pool_stays_usable(model, split_pool):
    class Cancel(Exception):
        pass

    seen = []

    def interrupt():
        if seen:
            raise Cancel()

    with pytest.raises(Cancel):
        split_pool.sample([job(job_args(batch=1))] * 2, lambda s, t: seen.append(s), interrupt)
    assert len(seen) < STEPS and split_pool.alive
    args = job_args(batch=1, seed=2)
    [x] = split_pool.sample([job(args)] * 2, lambda s, t: None, lambda: None)
    assert rel(x, sample_node_path(model, **args)[0]) <= TOLERANCE


def test_spread_batch_equals_one_process(model):
    pool = WorkerPool(ParallelPlan(("cpu", "cpu"), "spread batch"), cpu_threads=1)
    try:
        load(pool, model, "base")
        args = job_args(batch=4)
        halves = [dict(args, latent=args["latent"][i:i + 2], noise=args["noise"][i:i + 2]) for i in (0, 2)]
        parts = pool.sample([job(h) for h in halves], lambda s, t: None, lambda: None)
        ref, _ = sample_node_path(model, **args)
        assert rel(torch.cat(parts), ref) <= TOLERANCE
    finally:
        pool.close()


def test_a_dead_worker_gives_a_clear_error(model):
    pool = WorkerPool(ParallelPlan(("cpu", "cpu"), "spread batch"), cpu_threads=1)
    try:
        load(pool, model, "base")
        os.kill(pool.processes[1].pid, signal.SIGKILL)
        pool.processes[1].wait(10)
        with pytest.raises(WorkerFault, match=r"worker on cpu stopped unexpectedly with exit code -9 .*next prompt"):
            pool.sample([job(job_args(batch=1))] * 2, lambda s, t: None, lambda: None)
        assert not pool.alive
    finally:
        pool.close()


def test_plan_checks():
    with pytest.raises(ValueError, match="at least 2 devices"):
        ParallelPlan.parse("cpu", "split image")
    with pytest.raises(ValueError, match="'cuda:0' is not a visible GPU"):
        ParallelPlan.parse("0, 1", "split image")  # no GPU on CI
    with pytest.raises(ValueError, match="mode must be one of"):
        ParallelPlan(("cpu", "cpu"), "sideways")
    with pytest.raises(ValueError, match="not a device name"):
        ParallelPlan.parse("gpu0,gpu1", "split image")
    assert ParallelPlan.parse("cpu, cpu", "spread batch").backend == "gloo"
