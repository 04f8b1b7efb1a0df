"""What a FluxWorks Multi-GPU node asks for: the devices and how the work is divided, checked up front."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("split image", "spread batch")


@dataclass(frozen=True)
class ParallelPlan:
    """`devices`: one worker per entry ("cuda:0", "cuda:1", or "cpu" entries for the gloo path CI tests);
    `mode`: "split image" (context parallelism: every worker runs every image, each on its share of the tokens)
    or "spread batch" (each worker samples its share of the batch on its own)."""

    devices: tuple[str, ...]
    mode: str = "split image"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if len(self.devices) < 2:
            raise ValueError(f"FluxWorks Multi-GPU needs at least 2 devices, got {list(self.devices)}: list them as "
                             "'cuda:0,cuda:1' (or 'all')")
        kinds = {torch.device(d).type for d in self.devices}
        if len(kinds) != 1:
            raise ValueError(f"devices {list(self.devices)} mix device types; use only GPUs (or only 'cpu' to test)")
        if kinds != {"cpu"} and len(set(self.devices)) != len(self.devices):
            raise ValueError(f"devices {list(self.devices)} name a GPU twice; one worker per GPU")

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def backend(self) -> str:
        """NCCL between GPUs; gloo between CPU processes (the path the CPU tests run)."""
        return "gloo" if torch.device(self.devices[0]).type == "cpu" else "nccl"

    @classmethod
    def parse(cls, devices: str, mode: str) -> ParallelPlan:
        """'cuda:0, cuda:1' / '0,1' / 'all' (every visible GPU) / 'cpu,cpu' -> a checked plan."""
        text = devices.strip().lower()
        if text == "all":
            count = torch.cuda.device_count()
            if count < 2:
                raise ValueError(f"devices 'all': this machine has {count} CUDA GPU(s); FluxWorks Multi-GPU needs 2 "
                                 "or more (remove the node to sample on one GPU)")
            return cls(tuple(f"cuda:{i}" for i in range(count)), mode)
        names = [p.strip() for p in text.split(",") if p.strip()]
        names = [f"cuda:{p}" if p.isdigit() else p for p in names]
        for name in names:
            try:
                device = torch.device(name)
            except RuntimeError as e:
                raise ValueError(f"devices: {name!r} is not a device name ({e}); write e.g. 'cuda:0,cuda:1'") from e
            if device.type == "cuda" and (device.index is None or device.index >= torch.cuda.device_count()):
                raise ValueError(f"devices: {name!r} is not a visible GPU (this machine has "
                                 f"{torch.cuda.device_count()}); write e.g. 'cuda:0,cuda:1' or 'all'")
            if device.type not in ("cuda", "cpu"):
                raise ValueError(f"devices: {name!r}: only CUDA GPUs (and 'cpu' for testing) are supported")
        return cls(tuple(names), mode)


def context_degrees(world_size: int, heads: int) -> tuple[int, int]:
    """(ulysses_degree, ring_degree) for diffusers' ContextParallelConfig: Ulysses (one all-to-all each way per
    attention, the faster of the two on NVLink; xDiT's FLUX.1 figures) when the head count divides by the number
    of workers, else ring attention over all of them."""
    return (world_size, 1) if heads % world_size == 0 else (1, world_size)
