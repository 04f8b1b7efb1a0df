"""One worker process: holds the transformer on its device and runs sampling jobs from the server process.

The worker runs the same code the one-device FluxWorks Sampler runs (`flux_speed.prepare.sample_prepared`, so
speed options, the step cache and the per-block interrupt check are all there); in "split image" mode the
prepared transformer additionally gets diffusers' context parallelism, and every worker calls it on the same job.

The process is started by `bootstrap.py`; it talks to the server over two loopback connections. Messages in (a
tuple whose first item is the kind), after the WorkerSetup that comes first: ("weights", config, compute_dtype)
followed by a tensor stream (transport.send_tensors), ("sample", job_id, job), ("shutdown",). Messages out:
("ready",), ("progress", step, total), ("result", tensor), ("interrupted",), ("error", kind, text). The second
connection carries only the ids of jobs to cancel. Any error is reported and, in split mode, ends the worker: a
rank that left a collective half done would hang the others, so the server restarts them all. The worker ends
when the server's end of the connection closes, so it never outlives the server.
"""

from __future__ import annotations

import functools
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from ..flux_models.fp8_storage import keep_linear_weights_in
from ..flux_speed.prepare import PreparedSlot, sample_prepared
from .plan import context_degrees
from .transport import recv_message, recv_tensors, send_message


class Cancelled(Exception):
    """The server asked to stop (ComfyUI's Cancel)."""


class CancelInbox:
    """The cancel connection: job ids the server wants stopped. Reading it is a poll of a socket, cheap enough
    for a check before every block; ids of jobs other than the current one are stale and ignored."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.job: int | None = None
        self.cancelled: set[int] = set()

    def start(self, job: int) -> None:
        self.job = job
        self.is_set()
        self.cancelled = {j for j in self.cancelled if j >= job}

    def is_set(self) -> bool:
        while self.conn.poll():
            self.cancelled.add(recv_message(self.conn))
        return self.job in self.cancelled


@dataclass(frozen=True)
class WorkerSetup:
    rank: int
    world_size: int
    device: str
    mode: str
    backend: str
    init_method: str  # tcp://127.0.0.1:<port> (split mode's process group)
    threads: int = 0  # CPU threads (0: torch's default); the CPU tests give each worker one


def build_transformer(config: dict, state: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> torch.nn.Module:
    """diffusers' FluxTransformer2DModel from its config with the received tensors (no second copy: built on the
    meta device, the tensors assigned). Linears whose weights arrive in fp8 get the pack's fp8 storage hooks,
    as the loader gave them in the server."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"worker weights do not fit the transformer config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    fp8 = {name for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and m.weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)}
    if fp8:
        keep_linear_weights_in(model, next(iter({model.get_submodule(n).weight.dtype for n in fp8})),
                               compute_dtype, only=fp8)
    return model.eval().requires_grad_(False)


def _resolve_on_cpu(model: torch.nn.Module, config):
    """diffusers 0.42.1's `_resolve_parallel_config` places rank r on accelerator r % device_count, which divides
    by zero on a machine without one; the same steps with the CPU as the device (used by the gloo tests)."""
    from diffusers.models._modeling_parallel import ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    config = ParallelConfig(context_parallel_config=config)
    cp = config.context_parallel_config
    mesh = init_device_mesh("cpu", cp.mesh_shape, mesh_dim_names=cp.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    return config


def enable_context_parallel(model: torch.nn.Module, world_size: int, device: torch.device) -> None:
    """diffusers' own context parallelism on a prepared (cloned) transformer: its `_cp_plan` splits the image
    and text tokens over the ranks at the model's entry and gathers the output at `proj_out`; attention runs
    Ulysses (or ring) through the model's attention backend."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    ulysses, ring = context_degrees(world_size, model.config.num_attention_heads)
    if device.type == "cpu":
        model._resolve_parallel_config = functools.partial(_resolve_on_cpu, model)
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring))


class Worker:
    def __init__(self, conn: Connection, setup: WorkerSetup, cancel: CancelInbox) -> None:
        self.conn, self.setup, self.cancel = conn, setup, cancel
        self.device = torch.device(setup.device)
        self.split = setup.mode == "split image"
        self.model: torch.nn.Module | None = None
        self.weights_version = 0
        self.slot = PreparedSlot()

    # --- weights ---------------------------------------------------------------------------------------------
    def receive_weights(self, config: dict, compute_dtype: torch.dtype) -> None:
        tensors = recv_tensors(self.conn, self.device)
        if self.model is None:
            self.model = build_transformer(config, tensors, compute_dtype)
        else:  # a LoRA change: only the weights it touches (and the ones the last one touched) arrive
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, tensor in tensors.items():
                    if name not in params:
                        raise KeyError(f"weight update names {name!r}, which the worker's transformer lacks")
                    params[name].copy_(tensor)
        self.weights_version += 1
        self.slot.release()

    # --- sampling ----------------------------------------------------------------------------------------------
    def _cancel_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.cancel.is_set() else 0.0],
                            device=self.device if self.setup.backend == "nccl" else "cpu")
        if self.split:  # every rank must stop at the same step, or the others wait in a collective forever
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _block_check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled()

    def sample(self, job: dict) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("no weights received before the first job")

        def callback(step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
            if self.setup.rank == 0:
                send_message(self.conn, ("progress", step, total))
            if self._cancel_requested():
                raise Cancelled()

        parallel = (functools.partial(enable_context_parallel, world_size=self.setup.world_size, device=self.device)
                    if self.split else None)
        args = dict(job["sample_args"])
        for name in ("latent", "noise", "sigmas"):
            args[name] = args[name].to(self.device)
        x, _, _ = sample_prepared(
            self.model, job["options"], self.device, job["compute_dtype"],
            interrupt=None if self.split else self._block_check, slot=self.slot,
            weights_tag=self.weights_version, parallel=parallel, callback=callback, **args)
        return x.to("cpu")

    # --- loop --------------------------------------------------------------------------------------------------
    def serve(self) -> None:
        send_message(self.conn, ("ready",))
        while True:
            try:
                message = recv_message(self.conn)
            except (EOFError, OSError):  # the server process is gone
                return
            kind = message[0]
            if kind == "shutdown":
                return
            try:
                if kind == "weights":
                    self.receive_weights(message[1], message[2])
                    send_message(self.conn, ("ready",))
                elif kind == "sample":
                    self.cancel.start(message[1])
                    result = self.sample(message[2])
                    send_message(self.conn, ("result", result if self.setup.rank == 0 or not self.split else None))
                else:
                    raise ValueError(f"unknown message {kind!r}")
            except Cancelled:
                self.slot.release()
                send_message(self.conn, ("interrupted",))
            except BaseException as e:  # reported to the server, which raises it in the ComfyUI prompt
                text = f"{type(e).__name__}: {e}"
                if isinstance(e, torch.OutOfMemoryError):
                    kind_name = "out of memory"
                else:
                    kind_name = "error"
                send_message(self.conn, ("error", kind_name, text + "\n" + traceback.format_exc(limit=8)))
                if self.split:
                    return


def worker_main(conn: Connection, cancels: Connection) -> None:
    """Process entry point (bootstrap.py, started by pool.WorkerPool): the first message is the WorkerSetup."""
    setup: WorkerSetup = recv_message(conn)
    if setup.threads:
        torch.set_num_threads(setup.threads)
    device = torch.device(setup.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = setup.mode == "split image"
    if group:
        dist.init_process_group(setup.backend, init_method=setup.init_method, rank=setup.rank,
                                world_size=setup.world_size, device_id=device if device.type == "cuda" else None)
    try:
        Worker(conn, setup, CancelInbox(cancels)).serve()
    finally:
        if group and dist.is_initialized():
            dist.destroy_process_group()
        conn.close()
        cancels.close()
