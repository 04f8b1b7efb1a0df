"""Moving messages, weights and tensors between the server process and the workers over a connection.

Nothing goes through `Connection.send`: once torch.multiprocessing is imported (diffusers does), that pickler
shares tensors by file descriptor or /dev/shm, which needs multiprocessing's own process tree and its key (the
workers are separate processes, see bootstrap.py) and would share the server's weight storages, so the host
unpatching a LoRA in place would change the workers' weights under them. Messages are plain `pickle` (tensors
in them are copied: jobs and results are small), weights go as raw bytes one tensor at a time, so each worker
owns a private copy the moment it has read it."""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from multiprocessing.connection import Connection

import torch

_CHUNK = 256 << 20  # bytes per send_bytes call: bounded pipe buffers for multi-GiB tensors


def send_message(conn: Connection, message: object) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def recv_message(conn: Connection) -> object:
    return pickle.loads(conn.recv_bytes())


def send_tensors(conn: Connection, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Send (name, tensor) pairs: a header per tensor (name, dtype, shape), then its bytes; an end marker."""
    for name, tensor in tensors:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        raw = flat.view(torch.uint8)
        send_message(conn, (name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), raw.numel()))
        view = memoryview(raw.numpy())
        for start in range(0, len(view), _CHUNK):
            conn.send_bytes(view[start:start + _CHUNK])
    send_message(conn, None)


def recv_tensors(conn: Connection, device: torch.device) -> dict[str, torch.Tensor]:
    """Receive what `send_tensors` sent, as tensors on `device` (private copies)."""
    out: dict[str, torch.Tensor] = {}
    while (header := recv_message(conn)) is not None:
        name, dtype, shape, nbytes = header
        raw = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        got = 0
        while got < nbytes:
            got += conn.recv_bytes_into(view, got)
        out[name] = raw.view(getattr(torch, dtype)).reshape(shape).to(device)
    return out
