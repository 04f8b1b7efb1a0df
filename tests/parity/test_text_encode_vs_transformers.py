"""Our text encoders (ComfyUI-format files, configs inferred) against transformers and FluxPipeline."""

import pytest
import torch

from devtools.tiny_models import write_text_encoders
from fluxworks.flux_models.text_encoders import encode, load_clip_l, load_t5
from tests.parity.conftest import make_pipeline, rel_err

PROMPTS = ["a small red circle at the top left", "", "ünïcode, punctuation!? and numbers 12345"]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, text_encoders):
    t5_path, clip_path = write_text_encoders(str(tmp_path_factory.mktemp("te")), *text_encoders)
    return load_t5(t5_path, None, torch.float32), load_clip_l(clip_path, torch.float32)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("max_len", [256, 512])
def test_encoding_equals_transformers_models(loaded, text_encoders, tokenizers, prompt, max_len):
    t5_ref, clip_ref = text_encoders
    ours = encode(*loaded, tokenizers, prompt, None, max_len, torch.device("cpu"))
    t5_ids = tokenizers.t5(prompt, padding="max_length", max_length=max_len, truncation=True,
                           return_tensors="pt").input_ids
    clip_ids = tokenizers.clip(prompt, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
    with torch.no_grad():
        assert rel_err(ours.t5_embeds, t5_ref(t5_ids)[0]) <= 1e-5
        assert rel_err(ours.clip_pooled, clip_ref(clip_ids).pooler_output) <= 1e-5
    assert ours.t5_embeds.shape == (1, max_len, 64)


def test_encoding_equals_flux_pipeline_encode_prompt(loaded, text_encoders, tokenizers, transformers_by_variant):
    pipe = make_pipeline(transformers_by_variant["dev"], "dev", text_encoders, tokenizers)
    pipe.tokenizer_max_length = 77  # ComfyUI's CLIP tokenizer files declare 8192; FLUX.1's CLIP-L reads 77
    embeds, pooled, _ = pipe.encode_prompt("a blue square", prompt_2="a red star", max_sequence_length=256)
    ours = encode(*loaded, tokenizers, "a red star", "a blue square", 256, torch.device("cpu"))
    assert rel_err(ours.t5_embeds, embeds) <= 1e-5
    assert rel_err(ours.clip_pooled, pooled) <= 1e-5


def test_long_prompts_are_truncated_and_counted(loaded, tokenizers):
    ours = encode(*loaded, tokenizers, "word " * 10_000, None, 256, torch.device("cpu"))
    assert ours.t5_embeds.shape[1] == 256
    assert ours.t5_dropped_tokens > 9000 and ours.clip_dropped_tokens > 9000


def test_an_interrupt_stops_the_encode_between_layers_and_leaves_no_hooks(loaded, tokenizers):
    """The node passes ComfyUI's cancel check: it runs before each CLIP layer and T5 sublayer, and the hooks are
    gone afterwards (a cancelled encode leaves the shared models as they were; the next encode is unchanged)."""
    class Cancelled(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled

    before = encode(*loaded, tokenizers, "a red star", None, 256, torch.device("cpu"))
    with pytest.raises(Cancelled):
        encode(*loaded, tokenizers, "a red star", None, 256, torch.device("cpu"), interrupt=interrupt)
    assert len(calls) == 3  # CLIP-L's 2 layers, then T5's first sublayer
    assert not any(m._forward_pre_hooks for model in loaded for m in model.modules())
    after = encode(*loaded, tokenizers, "a red star", None, 256, torch.device("cpu"), interrupt=lambda: None)
    assert torch.equal(after.t5_embeds, before.t5_embeds) and torch.equal(after.clip_pooled, before.clip_pooled)
