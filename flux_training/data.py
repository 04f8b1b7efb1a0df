"""A training set encoded once: model-space latents grouped by size (aspect-ratio buckets) and text embeddings,
so the VAE and the text encoders are not needed (and can leave the device) while the transformer trains.

Each bucket holds the samples of one latent size; a batch comes from one bucket (every sample in it has the same
token count), the bucket drawn with probability proportional to its size. Caption dropout swaps a sample's text
for the empty prompt's embedding (kohya's `caption_dropout_rate`), which keeps the unconditional branch intact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TrainingBatch:
    latents: torch.Tensor  # (B, 16, H, W) model-space latents, float32
    text: torch.Tensor  # (B, L, C) T5 token embeddings
    pooled: torch.Tensor  # (B, P) CLIP-L pooled embedding


@dataclass
class Bucket:
    latents: torch.Tensor  # (N, 16, H, W)
    text: torch.Tensor  # (N, L, C)
    pooled: torch.Tensor  # (N, P)
    captions: list[str]


@dataclass
class CachedDataset:
    buckets: list[Bucket]
    empty_text: torch.Tensor  # (L, C) the empty prompt, for caption dropout
    empty_pooled: torch.Tensor  # (P,)
    caption_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.buckets or not sum(len(b.captions) for b in self.buckets):
            raise ValueError("the dataset has no images")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")

    @classmethod
    def from_samples(cls, latents: list[torch.Tensor], text: torch.Tensor, pooled: torch.Tensor, captions: list[str],
                     empty_text: torch.Tensor, empty_pooled: torch.Tensor, caption_dropout: float = 0.0) -> CachedDataset:
        """Group per-sample latents (each (16, H, W)) into buckets by size; text (N, L, C), pooled (N, P)."""
        if not (len(latents) == len(text) == len(pooled) == len(captions)):
            raise ValueError(f"{len(latents)} latents, {len(text)} texts, {len(pooled)} pooled, {len(captions)} "
                             "captions: one of each per image")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, latent in enumerate(latents):
            groups.setdefault(tuple(latent.shape[-2:]), []).append(i)
        buckets = [Bucket(torch.stack([latents[i] for i in idx]).float(), text[idx], pooled[idx],
                          [captions[i] for i in idx]) for _, idx in sorted(groups.items())]
        return cls(buckets, empty_text, empty_pooled, caption_dropout)

    def __len__(self) -> int:
        return sum(len(b.captions) for b in self.buckets)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(width, height) in pixels of each bucket."""
        return [(b.latents.shape[3] * 8, b.latents.shape[2] * 8) for b in self.buckets]

    def to(self, device: torch.device) -> CachedDataset:
        moved = [Bucket(b.latents.to(device), b.text.to(device), b.pooled.to(device), b.captions) for b in self.buckets]
        return CachedDataset(moved, self.empty_text.to(device), self.empty_pooled.to(device), self.caption_dropout)

    def sample(self, batch: int, generator: torch.Generator) -> TrainingBatch:
        """`batch` samples (with replacement) of one bucket, on the generator's device; dropout applied."""
        device = generator.device
        counts = torch.tensor([len(b.captions) for b in self.buckets]).cumsum(0)
        pick = int(torch.randint(0, int(counts[-1]), (), generator=generator, device=device))
        bucket = self.buckets[int(torch.searchsorted(counts, pick, right=True))]
        which = torch.randint(0, len(bucket.captions), (batch,), generator=generator, device=device)
        text, pooled = bucket.text[which.to(bucket.text.device)], bucket.pooled[which.to(bucket.text.device)]
        if self.caption_dropout > 0:
            drop = (torch.rand(batch, generator=generator, device=device) < self.caption_dropout).to(text.device)
            text = torch.where(drop[:, None, None], self.empty_text[None].to(text.dtype), text)
            pooled = torch.where(drop[:, None], self.empty_pooled[None].to(pooled.dtype), pooled)
        return TrainingBatch(bucket.latents[which.to(bucket.latents.device)].float(), text, pooled)


@torch.no_grad()
def encode_examples(pictures: list, captions: list[str], encode_pictures: Callable, encode_texts: Callable,
                    caption_dropout: float = 0.0, interrupt: Callable[[], None] | None = None) -> CachedDataset:
    """Encode every picture once (`encode_pictures`: (1, H, W, 3) uint8 -> (1, 16, H/8, W/8) model-space latent)
    and every distinct caption plus the empty prompt once (`encode_texts`: list -> ((N, L, C), (N, P))), into a
    CachedDataset. `interrupt` (the host's cancel check) runs between pictures. Encoded without autograd: the
    cached tensors carry no graph back into the encoders, whose weights may require gradients."""
    latents = []
    for pixels in pictures:
        if interrupt is not None:
            interrupt()
        latents.append(encode_pictures(torch.from_numpy(np.array(pixels, dtype=np.uint8))[None])[0].float().cpu())
    distinct = sorted(set(captions)) + [""]
    text, pooled = encode_texts(distinct)
    row = {c: i for i, c in enumerate(distinct)}
    index = torch.tensor([row[c] for c in captions])
    return CachedDataset.from_samples(latents, text[index].float().cpu(), pooled[index].float().cpu(), list(captions),
                                      text[-1].float().cpu(), pooled[-1].float().cpu(), caption_dropout)
