"""One training step of flux_training equals the same step computed the way diffusers'
`examples/dreambooth/train_dreambooth_lora_flux.py` computes it (same noise, timesteps and weighting), on a tiny
random FLUX.1-dev at fp32: the loss and every LoRA gradient. The saved file loads with zero unmatched keys in
diffusers' `load_lora_weights` and gives the outputs of our in-memory adapter; resuming continues the same run."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from peft import LoraConfig

from devtools.tiny_models import random_flux
from fluxworks.flux_training import CachedDataset, LoraTrainer, TrainingBatch, TrainSettings, sample_sigmas
from fluxworks.flux_training.lora import ATTENTION, MLP, lora_parameters, lora_target_modules, training_adapter
from fluxworks.flux_training.trainer import flow_matching_loss, flow_prediction, state_path

B, H, W, L = 2, 8, 12, 7  # batch, latent height and width (non-square: the packing order matters), T5 tokens
GUIDANCE = 3.5


def batch(seed: int = 0) -> TrainingBatch:
    g = torch.Generator().manual_seed(seed)
    return TrainingBatch(torch.randn(B, 16, H, W, generator=g), torch.randn(B, L, 64, generator=g),
                         torch.randn(B, 64, generator=g))


def script_step(transformer, data: TrainingBatch, noise: torch.Tensor, u: torch.Tensor, weighting_scheme: str):
    """The script's training-step arithmetic (facts from train_dreambooth_lora_flux.py, rewritten for a test)."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = scheduler.sigmas[step_indices].flatten()[:, None, None, None]
    x0 = data.latents
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy, B, 16, H, W)
    img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x0.device, x0.dtype)
    pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=torch.tensor([GUIDANCE]).expand(B),
                       pooled_projections=data.pooled, encoder_hidden_states=data.text,
                       txt_ids=torch.zeros(L, 3), img_ids=img_ids, return_dict=False)[0]
    pred = FluxPipeline._unpack_latents(pred, height=H * 8, width=W * 8, vae_scale_factor=8)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - x0
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(B, -1), 1).mean()
    return loss, sigmas.flatten()


@pytest.mark.parametrize("mode,scheme", [("uniform", "none"), ("logit_normal", "logit_normal")])
def test_timestep_sampling_matches_the_script(mode, scheme):
    ours = sample_sigmas(mode, 64, (H, W), torch.Generator().manual_seed(3))
    u = compute_density_for_timestep_sampling(scheme, 64, 0.0, 1.0, generator=torch.Generator().manual_seed(3))
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    torch.testing.assert_close(ours, scheduler.sigmas[(u * 1000).long()], rtol=0, atol=0)


def test_lora_layers_are_the_scripts_defaults():
    flux = random_flux("dev", 0)
    script_default = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                      "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                      "ff_context.net.2"]
    assert sorted(lora_target_modules(flux, "attention_mlp")) == sorted(script_default)
    assert sorted(ATTENTION + MLP) == sorted(script_default)
    assert lora_target_modules(flux, "to_k, to_q") == ["to_k", "to_q"]  # the script's comma list, as given


@pytest.mark.parametrize("layers", ["attention", "attention_mlp", "all"])
def test_one_step_equals_the_scripts_step(layers):
    torch.manual_seed(0)
    flux = random_flux("dev", 0)
    reference = copy.deepcopy(flux)
    settings = TrainSettings(steps=1, rank=4, alpha=8.0, guidance=GUIDANCE, lora_layers=layers, seed=1,
                             timestep_sampling="uniform")
    data = batch()
    noise = torch.randn(B, 16, H, W, generator=torch.Generator().manual_seed(9))
    u = compute_density_for_timestep_sampling("none", B, generator=torch.Generator().manual_seed(4))
    with LoraTrainer(flux, settings, torch.device("cpu")) as trainer:
        # the script's adapter: its LoraConfig on a copy, with our initial LoRA weights copied in
        config = LoraConfig(r=4, lora_alpha=8.0, init_lora_weights="gaussian",
                            target_modules=lora_target_modules(reference, layers))
        reference.requires_grad_(False)
        reference.add_adapter(config)
        ref_params = dict((n, p) for n, p in reference.named_parameters() if "lora_" in n)
        ours = dict((n, p) for n, p in flux.named_parameters() if "lora_" in n)
        assert sorted(ref_params) == sorted(ours) and ours
        with torch.no_grad():
            for n, p in ref_params.items():
                p.copy_(ours[n])
                ours[n].data += torch.randn_like(p) * 0.1  # B starts at zero: move it so A gets gradients too
                p.copy_(ours[n])
        expected_loss, sigmas = script_step(reference, data, noise, u, "none")
        expected_loss.backward()
        loss = flow_matching_loss(flux, data, noise, sigmas, GUIDANCE)
        loss.backward()
        torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-7)
        for n, p in ours.items():
            torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-5, atol=1e-8, msg=n)
        assert trainer.guidance == GUIDANCE
    assert not any("lora_" in n for n, _ in flux.named_parameters())  # the adapter is gone after training


def test_saved_file_loads_in_diffusers_and_matches_our_adapter(tmp_path):
    flux = random_flux("dev", 0)
    path = str(tmp_path / "trained.safetensors")
    settings = TrainSettings(steps=3, rank=4, alpha=4.0, learning_rate=1e-2, lora_layers="all", seed=2)
    dataset = CachedDataset.from_samples(list(batch().latents), batch().text, batch().pooled, ["a", "b"],
                                         torch.zeros(L, 64), torch.zeros(64))
    data = batch(5)
    sigma = torch.tensor([0.3, 0.8])
    with LoraTrainer(flux, settings, torch.device("cpu")) as trainer:
        trainer.train(trainer.dataset_loss(dataset), checkpoint=path)
        with torch.no_grad():
            ours = flow_prediction(flux, data.latents, sigma, data.text, data.pooled, GUIDANCE)
    with torch.no_grad():
        base = flow_prediction(flux, data.latents, sigma, data.text, data.pooled, GUIDANCE)
    assert (ours - base).abs().max() > 1e-3  # the LoRA changes the output
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=copy.deepcopy(flux))
    state = FluxPipeline.lora_state_dict(path)
    pipe.load_lora_weights(path, adapter_name="trained")
    assert isinstance(pipe.transformer, FluxTransformer2DModel)
    loaded = {n for n, _ in pipe.transformer.named_parameters() if "lora_" in n}
    assert len(loaded) == len(state)  # zero unmatched keys: every tensor of the file became an adapter tensor
    with torch.no_grad():
        theirs = flow_prediction(pipe.transformer, data.latents, sigma, data.text, data.pooled, GUIDANCE)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_resume_continues_the_same_run(tmp_path):
    """3 steps, stop, resume to 6 == 6 steps at once (same data order, noise, optimiser moments, lr schedule)."""
    data = batch()
    dataset = CachedDataset.from_samples(list(data.latents), data.text, data.pooled, ["a", "b"], torch.zeros(L, 64),
                                         torch.zeros(64), caption_dropout=0.2)
    settings = TrainSettings(steps=6, rank=4, learning_rate=1e-2, lr_schedule="cosine", lr_warmup_steps=2, seed=3,
                             gradient_accumulation=2, batch_size=1)
    straight = random_flux("dev", 0)
    with LoraTrainer(straight, settings, torch.device("cpu")) as trainer:
        losses = trainer.train(trainer.dataset_loss(dataset))
        expected = [p.detach().clone() for p in lora_parameters(straight)]

    flux = random_flux("dev", 0)
    path = str(tmp_path / "run.safetensors")

    class Stop(Exception):
        pass

    def stop_at_3(report):
        if report.step == 3:
            raise Stop

    with pytest.raises(Stop), LoraTrainer(flux, settings, torch.device("cpu")) as trainer:
        trainer.train(trainer.dataset_loss(dataset), progress=stop_at_3, checkpoint=path)
    assert state_path(path).endswith("run.state.safetensors")
    with LoraTrainer(flux, settings, torch.device("cpu"), resume=path) as trainer:
        assert trainer.step == 3
        resumed = trainer.train(trainer.dataset_loss(dataset))
        got = [p.detach().clone() for p in lora_parameters(flux)]
    assert resumed == pytest.approx(losses, rel=1e-5)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_adapter_refuses_a_model_that_has_one():
    flux = random_flux("dev", 0)
    config = LoraConfig(r=2, target_modules=list(ATTENTION))
    with training_adapter(flux, config):
        with pytest.raises(ValueError, match="already carries a peft adapter"):
            with training_adapter(flux, config):
                pass


def test_saved_file_through_the_packs_lora_stack_matches_our_adapter(tmp_path):
    from fluxworks.flux_lora import RouteTable, add_deltas, convert_lora, linear_shapes, read_lora_file

    flux = random_flux("dev", 0)
    path = str(tmp_path / "trained.safetensors")
    data = batch(5)
    dataset = CachedDataset.from_samples(list(data.latents), data.text, data.pooled, ["a", "b"], torch.zeros(L, 64),
                                         torch.zeros(64))
    sigma = torch.tensor([0.3, 0.8])
    settings = TrainSettings(steps=3, rank=4, alpha=8.0, learning_rate=1e-2, lora_layers="all", seed=2)
    with LoraTrainer(flux, settings, torch.device("cpu")) as trainer:
        trainer.train(trainer.dataset_loss(dataset), checkpoint=path)
        with torch.no_grad():
            ours = flow_prediction(flux, data.latents, sigma, data.text, data.pooled, GUIDANCE)
    lora = read_lora_file(path)
    converted = convert_lora(lora.tensors, RouteTable.build(linear_shapes(flux, "transformer.")), lora.metadata,
                             lora.adapter_config, source="trained")
    assert converted.unmatched == () and converted.layers_matched == len(lora.tensors) // 2
    merged = copy.deepcopy(flux)
    weights = dict(merged.named_parameters())
    with torch.no_grad():
        for key, adapters in converted.component_patches("transformer").items():
            add_deltas(weights[key.removeprefix("transformer.")].data, adapters, 1.0)
        theirs = flow_prediction(merged, data.latents, sigma, data.text, data.pooled, GUIDANCE)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
