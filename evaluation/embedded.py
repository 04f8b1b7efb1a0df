"""Text-to-image with the embedded model outside ComfyUI: the files load through `flux_models` (the same
loaders the FluxWorks nodes use), sampling runs through `flux_sampler`, decoding through the taef1 layout.

This is what the adherence test, the benchmark and the docs images use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from devtools.taesd_arch import TinyAutoencoder
from fluxworks.flux_models.files import load_safetensors
from fluxworks.flux_models.text_encoders import Tokenizers, encode, load_clip_l, load_t5
from fluxworks.flux_models.transformer import load_flux_transformer
from fluxworks.flux_sampler.guidance import GuidanceCurve
from fluxworks.flux_sampler.latents import LATENT_CHANNELS, make_noise, to_vae_space
from fluxworks.flux_sampler.sampling import TextConditioning
from fluxworks.flux_sampler.schedule import calculate_mu, get_sigmas, image_seq_len
from fluxworks.flux_speed.prepare import SpeedOptions, sample_prepared
from fluxworks.flux_speed.step_cache import StepCacheConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED_DIR = os.path.join(REPO, "embedded_model")
FILES = {
    # In ComfyUI's folder layout: the pack registers embedded_model/<folder>/ as a model folder.
    "transformer": "diffusion_models/flux1-shapes-tiny.safetensors",
    "t5": "text_encoders/t5xxl_shapes_tiny.safetensors",
    "clip_l": "text_encoders/clip_l_shapes_tiny.safetensors",
    "vae": "vae/taef1_shapes_tiny.safetensors",
}
# The settings docs/embedded_model.md recommends: best measured adherence (constant guidance 2 ties at 8, 12, 20
# and 28 steps; 12 steps keeps edges smooth and the CPU fast).
RECOMMENDED_STEPS = 12
RECOMMENDED_GUIDANCE = 2.0
RECOMMENDED_T5_LENGTH = 128  # trained mostly at 128 T5 tokens (10 % of batches at 512)
IMAGE_SIZE = 128
# One object: the model draws single objects reliably; with two or three it often mixes up colours (see docs).
DEMO_PROMPT = "a large orange circle in the center, on a purple background"


def load_autoencoder(path: str, device: torch.device | str = "cpu") -> TinyAutoencoder:
    """The taef1-layout VAE file as a module (strict: every key must fit)."""
    vae = TinyAutoencoder()
    state = load_safetensors(path)
    missing, unexpected = vae.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} is not a taef1-layout VAE: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return vae.to(device).eval().requires_grad_(False)


@dataclass(frozen=True)
class CacheStats:
    """How often the step cache stood in for the deep blocks: `reused` of `calls` transformer evaluations
    (one evaluation per step per prompt stream; the decision is taken for the whole batch at once)."""

    reused: int
    calls: int

    @property
    def reused_share(self) -> float:
        return self.reused / self.calls if self.calls else 0.0

    def __add__(self, other: CacheStats) -> CacheStats:
        return CacheStats(self.reused + other.reused, self.calls + other.calls)


@dataclass(frozen=True)
class Generation:
    """One sampling run: decoded images, the final raw VAE-space latents (float32, CPU) they were decoded
    from, and the step cache's counts (None when sampled without cache)."""

    images: np.ndarray
    latents: torch.Tensor
    cache: CacheStats | None


@dataclass
class EmbeddedPipeline:
    transformer: torch.nn.Module
    guidance_embeds: bool
    t5: torch.nn.Module
    clip: torch.nn.Module
    tokenizers: Tokenizers
    vae: TinyAutoencoder
    device: torch.device
    compute_dtype: torch.dtype

    @classmethod
    def load(cls, tokenizer_folders: tuple[str, str], folder: str = EMBEDDED_DIR, device: str = "cpu",
             compute_dtype: torch.dtype = torch.float32) -> EmbeddedPipeline:
        """Load the four files of `folder`; `tokenizer_folders` = (CLIP-L folder, T5 folder) as ComfyUI ships."""
        paths = {role: os.path.join(folder, name) for role, name in FILES.items()}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"embedded model files missing: {missing} (run training/train_embedded.py)")
        dev = torch.device(device)
        transformer, config, compute = load_flux_transformer(paths["transformer"], "default", compute_dtype)
        t5 = load_t5(paths["t5"], None, compute_dtype).to(dev)
        clip = load_clip_l(paths["clip_l"], compute_dtype).to(dev)
        return cls(transformer.to(dev), config.guidance_embeds, t5, clip, Tokenizers.from_folders(*tokenizer_folders),
                   load_autoencoder(paths["vae"], dev), dev, compute)

    def encode(self, prompts: list[str], max_sequence_length: int = RECOMMENDED_T5_LENGTH) -> TextConditioning:
        """Batched FLUX.1 conditioning, each prompt encoded exactly as FluxWorksTextEncode encodes it."""
        encoded = [encode(self.t5, self.clip, self.tokenizers, p, None, max_sequence_length, self.device)
                   for p in prompts]
        return TextConditioning(torch.cat([e.t5_embeds for e in encoded]), torch.cat([e.clip_pooled for e in encoded]))

    def generate(self, prompts: list[str], seeds: list[int], steps: int = RECOMMENDED_STEPS,
                 curve: GuidanceCurve | None = None, negative: str | None = None,
                 max_sequence_length: int = RECOMMENDED_T5_LENGTH, size: int = IMAGE_SIZE,
                 cache: StepCacheConfig | None = None) -> np.ndarray:
        """(N, size, size, 3) uint8 images; prompt i starts from `make_noise(seed_i)` of one latent.
        `cache` samples through the first-block step cache (see `sample` for its counts)."""
        return self.sample(prompts, seeds, steps, curve, negative, max_sequence_length, size, cache).images

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], steps: int = RECOMMENDED_STEPS,
               curve: GuidanceCurve | None = None, negative: str | None = None,
               max_sequence_length: int = RECOMMENDED_T5_LENGTH, size: int = IMAGE_SIZE,
               cache: StepCacheConfig | None = None, speed: SpeedOptions | None = None) -> Generation:
        """As `generate`, also returning the final latents and, with `cache`, how many transformer calls
        reused the cache. Each call starts a fresh cache state, so runs never share residuals. `speed`: the
        options a FluxWorks Speed node sets (default: what the sampler runs without one)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        curve = curve or GuidanceCurve.constant(RECOMMENDED_GUIDANCE)
        latent_hw = (size // 8, size // 8)
        positive = self.encode(prompts, max_sequence_length)
        neg = self.encode([negative], max_sequence_length) if negative is not None else None
        noise = torch.cat([make_noise((1, LATENT_CHANNELS, *latent_hw), s) for s in seeds]).to(self.device)
        sigmas = get_sigmas(steps, calculate_mu(image_seq_len(*latent_hw)) if self.guidance_embeds else None)
        # The FluxWorks Sampler's own path: the prepared transformer with the options a Step Cache node sets.
        options = replace(speed or SpeedOptions.defaults_for(self.device), cache=cache)
        x, _, prepared = sample_prepared(
            self.transformer, options, self.device, self.compute_dtype, guidance_embeds=self.guidance_embeds,
            positive=positive, negative=neg, latent=torch.zeros_like(noise), noise=noise,
            sigmas=sigmas.to(self.device), curve=curve)
        stats = None
        if prepared.cache is not None:
            stats = CacheStats(prepared.cache.hits, prepared.cache.hits + prepared.cache.misses)
        latents = to_vae_space(x)
        return Generation(self.decode(latents), latents.float().cpu(), stats)

    @torch.no_grad()
    def decode(self, raw_latents: torch.Tensor) -> np.ndarray:
        images = self.vae.decode(raw_latents.to(self.device, torch.float32))  # (N, 3, H, W) in [-1, 1]
        images = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return images.permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def reconstruct(self, images: np.ndarray) -> np.ndarray:
        """VAE round trip of (N, H, W, 3) uint8 images (an upper bound for what generation can show)."""
        x = torch.from_numpy(images).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return self.decode(self.vae.encode(x))
