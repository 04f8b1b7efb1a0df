"""FluxRunner: diffusers `FluxTransformer2DModel.forward`, block by block, with hooks for the step cache and
for streaming blocks from CPU memory (block offload). Same inputs and outputs as the transformer, so the
sampler uses either; with no cache and no offload it computes exactly what the transformer computes."""

from __future__ import annotations

import math

import torch

from .step_cache import StepCacheConfig, StepCacheState


class FluxRunner(torch.nn.Module):
    def __init__(self, transformer: torch.nn.Module, cache: StepCacheConfig | None = None, offloader=None) -> None:
        super().__init__()
        self.transformer = transformer
        self.cache_config = cache
        self.offloader = offloader
        self.cache_state: StepCacheState | None = None
        self._sigmas: torch.Tensor | None = None

    @property
    def config(self):
        return self.transformer.config

    def begin(self, sigmas: torch.Tensor) -> None:
        """Start a sampling run over `sigmas`: fresh cache state, and the schedule to place each call in it."""
        self._sigmas = sigmas.detach().flatten().to("cpu", torch.float64)
        self.cache_state = StepCacheState(self.cache_config) if self.cache_config is not None else None

    def _progress(self, timestep: torch.Tensor) -> float:
        if self._sigmas is None or len(self._sigmas) < 2:
            return 0.0
        value = float(timestep.detach().flatten()[0])
        index = int(torch.argmin((self._sigmas[:-1] - value).abs()))
        return 0.0 if len(self._sigmas) <= 2 else index / (len(self._sigmas) - 2)

    def _block(self, block: torch.nn.Module) -> torch.nn.Module:
        return self.offloader.fetch(block) if self.offloader is not None else block

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None, joint_attention_kwargs=None, controlnet_block_samples=None,
                controlnet_single_block_samples=None, return_dict: bool = False, controlnet_blocks_repeat=False):
        tr = self.transformer
        if self.offloader is not None:
            self.offloader.start_pass()
        stream_key = self._stream_key(encoder_hidden_states) if self.cache_state is not None else None
        progress = self._progress(timestep)
        hidden_states = tr.x_embedder(hidden_states)
        t = timestep.to(hidden_states.dtype) * 1000
        if guidance is None:
            temb = tr.time_text_embed(t, pooled_projections)
        else:
            temb = tr.time_text_embed(t, guidance.to(hidden_states.dtype) * 1000, pooled_projections)
        encoder_hidden_states = tr.context_embedder(encoder_hidden_states)
        rotary = tr.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        blocks = list(tr.transformer_blocks)
        singles = list(tr.single_transformer_blocks)
        cache = self.cache_state
        start = 0
        if cache is not None and blocks:
            before = hidden_states
            encoder_hidden_states, hidden_states = self._block(blocks[0])(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                image_rotary_emb=rotary, joint_attention_kwargs=joint_attention_kwargs)
            hidden_states = self._add_control(hidden_states, controlnet_block_samples, 0, len(blocks),
                                              controlnet_blocks_repeat)
            first_residual = hidden_states - before
            start = 1
            if cache.can_reuse(stream_key, first_residual, progress):
                cache.record_hit(stream_key)
                hidden_states = hidden_states + cache.stream(stream_key).rest_residual
                if self.offloader is not None:
                    self.offloader.skip_pass()
                return self._finish(hidden_states, temb, return_dict)
            after_first = hidden_states

        for index in range(start, len(blocks)):
            encoder_hidden_states, hidden_states = self._block(blocks[index])(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                image_rotary_emb=rotary, joint_attention_kwargs=joint_attention_kwargs)
            hidden_states = self._add_control(hidden_states, controlnet_block_samples, index, len(blocks),
                                              controlnet_blocks_repeat)
        for index, block in enumerate(singles):
            encoder_hidden_states, hidden_states = self._block(block)(
                hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                image_rotary_emb=rotary, joint_attention_kwargs=joint_attention_kwargs)
            if controlnet_single_block_samples is not None:
                interval = int(math.ceil(len(singles) / len(controlnet_single_block_samples)))
                hidden_states = hidden_states + controlnet_single_block_samples[index // interval]
        if cache is not None and blocks:
            cache.record_full(stream_key, first_residual, hidden_states - after_first)
        return self._finish(hidden_states, temb, return_dict)

    @staticmethod
    def _stream_key(text: torch.Tensor) -> tuple:
        """Identifies the prompt stream (positive / negative) by content: the sampler may hand over a fresh
        copy of the same text embeddings at every step."""
        return (tuple(text.shape), round(float(text.detach()[..., :32].float().sum()), 3))

    @staticmethod
    def _add_control(hidden_states, samples, index: int, n_blocks: int, repeat: bool):
        """ControlNet residuals for double block `index`, indexed as diffusers does."""
        if samples is None:
            return hidden_states
        if repeat:
            return hidden_states + samples[index % len(samples)]
        interval = int(math.ceil(n_blocks / len(samples)))
        return hidden_states + samples[index // interval]

    def _finish(self, hidden_states, temb, return_dict: bool):
        tr = self.transformer
        out = tr.proj_out(tr.norm_out(hidden_states, temb))
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=out)
        return (out,)
