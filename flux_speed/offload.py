"""Block offload for small GPUs: the first `resident` blocks stay on the GPU; the others live in pinned CPU
memory and are copied in on a side stream one block ahead of use, overlapping the copy with compute.

The offloader swaps `.data` of the blocks' own tensors, so it works on the caller's modules (shared parameters
included); `close()` ends streaming and hands the streamed blocks back in ordinary (pageable) CPU memory.

It is ours rather than diffusers' `apply_group_offloading` (block level, `use_stream=True`), which streams every
block: keeping the first N blocks resident is what lets FLUX.1 run at 166.7 ms/step under an 8 GiB cap with 12 of
57 blocks resident (docs/performance.md) instead of paying a copy for each of the 57. It is driven through
diffusers' hook registry (`attach_offload`), so the sampler calls diffusers' own forward.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK_NAME = "fluxworks_block_offload"


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in list(module.parameters()) + list(module.buffers())]


class BlockOffloader:
    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, resident: int = 0) -> None:
        self.blocks = blocks
        self.device = device
        self.order = {id(b): i for i, b in enumerate(blocks)}
        self.resident = max(0, min(resident, len(blocks)))
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.host: list[list[torch.Tensor]] = []
        for i, block in enumerate(blocks):
            if i < self.resident:
                block.to(device)
                self.host.append([])
                continue
            block.to("cpu")
            pinned = [t.data.pin_memory() if self.cuda else t.data for t in _tensors(block)]
            for t, p in zip(_tensors(block), pinned, strict=True):
                t.data = p
            self.host.append(pinned)
        self.loaded: dict[int, torch.cuda.Event | None] = {}

    def _load(self, index: int) -> None:
        if index >= len(self.blocks) or index < self.resident or index in self.loaded:
            return
        tensors = _tensors(self.blocks[index])
        if not self.cuda:
            self.loaded[index] = None
            return
        with torch.cuda.stream(self.copy_stream):
            for t, host in zip(tensors, self.host[index], strict=True):
                t.data = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.loaded[index] = event

    def _evict(self, index: int) -> None:
        if index < self.resident or index not in self.loaded:
            return
        for t, host in zip(_tensors(self.blocks[index]), self.host[index], strict=True):
            t.data = host
        del self.loaded[index]

    def start_pass(self) -> None:
        self._load(self.resident)

    def skip_pass(self) -> None:
        for index in list(self.loaded):
            if index != self.resident:
                self._evict(index)

    def fetch(self, block: torch.nn.Module) -> torch.nn.Module:
        index = self.order[id(block)]
        if index < self.resident:
            self._load(self.resident)  # start streaming the first offloaded block early
            return block
        self._load(index)
        event = self.loaded[index]
        if event is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(event)
            for t in _tensors(block):
                t.data.record_stream(main)  # freed only after the compute stream is done with it
        self._evict(index - 1)
        self._load(index + 1 if index + 1 < len(self.blocks) else self.resident)
        return block

    def close(self) -> None:
        """End streaming: drop the device copies and move the streamed blocks from pinned to pageable CPU memory.
        Pinned (page-locked) memory is scarce host memory the OS cannot swap, so it must not outlive the run;
        the resident blocks stay where they are (their owner moves them back)."""
        for index in list(self.loaded):
            self._evict(index)
        if self.cuda:
            self.copy_stream.synchronize()
            for block in self.blocks[self.resident:]:
                for t in _tensors(block):
                    t.data = torch.empty_like(t.data).copy_(t.data)
        self.host = [[] for _ in self.blocks]


class _PassHook(ModelHook):
    def __init__(self, offloader: BlockOffloader) -> None:
        super().__init__()
        self.offloader = offloader

    def pre_forward(self, module, *args, **kwargs):
        self.offloader.start_pass()
        return args, kwargs


class _FetchHook(ModelHook):
    def __init__(self, offloader: BlockOffloader) -> None:
        super().__init__()
        self.offloader = offloader

    def pre_forward(self, module, *args, **kwargs):
        self.offloader.fetch(module)
        return args, kwargs


def attach_offload(transformer: torch.nn.Module, offloader: BlockOffloader) -> None:
    """Stream `offloader.blocks` around each call of `transformer` (register before the step cache's hooks, so a
    block the cache skips is never fetched)."""
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_PassHook(offloader), HOOK_NAME)
    for block in offloader.blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_FetchHook(offloader), HOOK_NAME)
