"""The server side: start the workers, keep their weights current, divide a sampling job and gather the result.

A pool lives as long as the FLUX_MODEL that carries it (the sampler keeps it on the model, like the prepared
transformer), so the weights go to the workers once and a LoRA change sends only the weights it touches. Any
worker fault (an error, out of memory, a process that died) closes the whole pool and raises a clear error in the
prompt; the next prompt starts fresh workers. Workers are separate Python processes (`bootstrap.py` says why not
multiprocessing's spawn) connected over loopback sockets with a random key; they leave when the server's end of
their connection closes, so they never outlive ComfyUI.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import select
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable
from multiprocessing.connection import Client, Connection, wait

import torch

from .plan import ParallelPlan
from .transport import recv_message, send_message, send_tensors
from .worker import WorkerSetup

PACKAGE = __name__.rpartition(".flux_parallel")[0]  # the pack's module name in this process (ComfyUI's or tests')
PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOTSTRAP = os.path.join(PACK_DIR, "flux_parallel", "bootstrap.py")

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0  # importing torch + diffusers and joining the process group, per worker
CANCEL_GRACE_S = 30.0  # how long cancelled workers get to stop at a step boundary before they are killed


class WorkerFault(RuntimeError):
    """A worker failed; the pool is closed and the next prompt starts new workers."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shutdown(processes: list[subprocess.Popen], connections: list[Connection]) -> None:
    for conn in connections:
        try:
            send_message(conn, ("shutdown",))
        except (OSError, ValueError):
            pass  # already gone: killed below
    deadline = time.monotonic() + 10
    for p in processes:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
    for conn in connections:
        conn.close()


def _start_worker(key: bytes, deadline: float) -> tuple[subprocess.Popen, Connection, Connection]:
    """Start one worker process and connect to it: (process, message connection, cancel connection)."""
    env = dict(os.environ, FLUXWORKS_WORKER_KEY=key.hex())
    process = subprocess.Popen([sys.executable, BOOTSTRAP, PACKAGE, PACK_DIR], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE)
    try:
        return process, *_connect(process, key, deadline)
    except BaseException:
        process.kill()
        process.wait(5)
        raise


def _connect(process: subprocess.Popen, key: bytes, deadline: float) -> tuple[Connection, Connection]:
    """Read the port the worker listens on (its first stdout line) and open both connections."""
    line = b""
    while not line.endswith(b"\n"):
        if process.poll() is not None:
            raise WorkerFault(f"FluxWorks Multi-GPU: a worker process failed to start (exit code "
                              f"{process.returncode}); the server log has its error")
        if time.monotonic() > deadline:
            process.kill()
            raise WorkerFault("FluxWorks Multi-GPU: a worker process did not start within "
                              f"{START_TIMEOUT_S:.0f} s")
        if select.select([process.stdout], [], [], 0.5)[0]:
            line += os.read(process.stdout.fileno(), 64)
    process.stdout.close()
    address = ("127.0.0.1", int(line))
    return Client(address, authkey=key), Client(address, authkey=key)


class WorkerPool:
    """One worker process per device of `plan`."""

    def __init__(self, plan: ParallelPlan, cpu_threads: int = 0) -> None:
        self.plan = plan
        init = f"tcp://127.0.0.1:{_free_port()}"
        key = secrets.token_bytes(32)
        self.connections: list[Connection] = []
        self.cancels: list[Connection] = []
        self.processes: list[subprocess.Popen] = []
        self._jobs = itertools.count()
        opened: list[Connection] = []
        self._finalizer = weakref.finalize(self, _shutdown, self.processes, opened)
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            for rank, device in enumerate(plan.devices):
                process, conn, cancel = _start_worker(key, deadline)
                self.processes.append(process)
                self.connections.append(conn)
                self.cancels.append(cancel)
                opened += (conn, cancel)
                send_message(conn, WorkerSetup(rank, plan.world_size, device, plan.mode, plan.backend, init, cpu_threads))
        except BaseException:
            self.close()
            raise
        self.weights_id: object = None
        self.patched_names: frozenset[str] = frozenset()
        self._expect_all("ready", START_TIMEOUT_S, "starting")

    @property
    def alive(self) -> bool:
        return self._finalizer.alive and all(p.poll() is None for p in self.processes)

    def close(self) -> None:
        self._finalizer()

    # --- faults --------------------------------------------------------------------------------------------------
    def _fault(self, rank: int, what: str) -> WorkerFault:
        device = self.plan.devices[rank]
        self.close()
        return WorkerFault(f"FluxWorks Multi-GPU: the worker on {device} {what}; all workers were stopped and the "
                           "next prompt starts them again")

    def _died(self, rank: int) -> WorkerFault:
        code = self.processes[rank].poll()
        hint = " (killed: often the system running out of host memory)" if code in (-9, 137) else ""
        return self._fault(rank, f"stopped unexpectedly with exit code {code}{hint}")

    def _send(self, rank: int, message, tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
        try:
            send_message(self.connections[rank], message)
            if tensors is not None:
                send_tensors(self.connections[rank], tensors)
        except (OSError, EOFError):
            self._reap(rank)
            raise self._died(rank) from None

    def _recv(self, rank: int):
        try:
            return recv_message(self.connections[rank])
        except (EOFError, OSError):
            self._reap(rank)
            raise self._died(rank) from None

    def _reap(self, rank: int) -> None:
        """Wait briefly for a worker whose connection broke, so its exit code is known."""
        try:
            self.processes[rank].wait(5)
        except subprocess.TimeoutExpired:
            pass  # still running with a broken connection: _died reports it and close() kills it

    def _expect_all(self, kind: str, timeout: float, doing: str) -> None:
        deadline = time.monotonic() + timeout
        pending = set(range(len(self.connections)))
        while pending:
            ready = wait([self.connections[r] for r in pending], timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            for conn in ready:
                rank = self.connections.index(conn)
                message = self._recv(rank)
                if message[0] == "error":
                    raise self._fault(rank, f"failed while {doing}: {message[2]}")
                if message[0] != kind:
                    raise self._fault(rank, f"answered {message[0]!r} while {doing}")
                pending.discard(rank)
            for rank in list(pending):
                if self.processes[rank].poll() is not None:
                    raise self._died(rank)
            if pending and time.monotonic() > deadline:
                raise self._fault(min(pending), f"did not answer within {timeout:.0f} s while {doing}")

    # --- weights ---------------------------------------------------------------------------------------------
    def load_weights(self, weights_id: object, config: dict, compute_dtype: torch.dtype,
                     named_tensors: Callable[[Iterable[str] | None], Iterable[tuple[str, torch.Tensor]]],
                     patched_names: frozenset[str]) -> bool:
        """Bring the workers' weights to `weights_id` (the host's id of the merged weight patches). The first time
        every tensor is sent; afterwards only the ones patched now or by the previous weights. `named_tensors(names)`
        yields (name, tensor) for those names (None: all). Returns whether anything was sent."""
        if weights_id == self.weights_id:
            return False
        names = None if self.weights_id is None else sorted(patched_names | self.patched_names)
        for rank in range(len(self.connections)):
            self._send(rank, ("weights", dict(config), compute_dtype), named_tensors(names))
        self._expect_all("ready", START_TIMEOUT_S, "loading weights")
        self.weights_id, self.patched_names = weights_id, patched_names
        return True

    # --- sampling --------------------------------------------------------------------------------------------------
    def sample(self, jobs: list[dict], progress: Callable[[int, int], None], check_interrupt: Callable[[], None]
               ) -> list[torch.Tensor]:
        """Run `jobs[r]` on worker r (split mode: the same job on every worker; spread mode: a batch smaller than
        the pool leaves the last workers idle) and return their results in rank order (split mode: rank 0's). `progress(step, total)` is called as rank 0 reports steps; `check_interrupt`
        (the host's cancel check, which raises) is polled while waiting: the workers are told to stop and given
        CANCEL_GRACE_S to do so at their next check before they are killed."""
        job_id = next(self._jobs)
        split = self.plan.mode == "split image"
        if (len(jobs) != len(self.connections)) if split else not 0 < len(jobs) <= len(self.connections):
            raise ValueError(f"{len(jobs)} jobs for {len(self.connections)} workers in mode {self.plan.mode!r}")
        for rank, job in enumerate(jobs):
            self._send(rank, ("sample", job_id, job))
        results: dict[int, torch.Tensor | None] = {}
        cancelled: BaseException | None = None
        deadline = None
        while len(results) < len(jobs):
            ready = wait([self.connections[r] for r in range(len(jobs)) if r not in results], timeout=0.1)
            for conn in ready:
                rank = self.connections.index(conn)
                message = self._recv(rank)
                if message[0] == "progress":
                    progress(message[1], message[2])
                elif message[0] == "result":
                    results[rank] = message[1]
                elif message[0] == "interrupted":
                    results[rank] = None
                elif message[0] == "error":
                    raise self._fault(rank, f"failed ({message[1]}): {message[2]}")
            for rank in range(len(jobs)):
                if rank not in results and self.processes[rank].poll() is not None:
                    raise self._died(rank)
            if cancelled is None:
                try:
                    check_interrupt()
                except BaseException as e:  # ComfyUI's interrupt: stop the workers, then re-raise it
                    cancelled, deadline = e, time.monotonic() + CANCEL_GRACE_S
                    for rank in range(len(jobs)):
                        self._send_cancel(rank, job_id)
            elif time.monotonic() > deadline:
                self.close()
                raise cancelled
        if cancelled is not None:
            raise cancelled
        wanted = [0] if split else range(len(jobs))  # split: every rank holds the image
        if any(results[r] is None for r in wanted):
            raise self._fault(min(r for r in wanted if results[r] is None), "stopped without being cancelled")
        return [results[r] for r in wanted]

    def _send_cancel(self, rank: int, job_id: int) -> None:
        try:
            send_message(self.cancels[rank], job_id)
        except OSError:
            pass  # the worker is gone: the wait loop reports it
