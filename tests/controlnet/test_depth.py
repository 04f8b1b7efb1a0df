"""Depth maps from a transformers depth model in a local folder (a tiny random Depth Anything here)."""

from __future__ import annotations

import pytest
import torch

from devtools.tiny_controlnets import write_depth_model
from fluxworks.flux_controlnet.depth import estimate_depth, is_depth_model_folder, load_depth_model


@pytest.fixture(scope="module")
def depth_folder(tmp_path_factory) -> str:
    return write_depth_model(str(tmp_path_factory.mktemp("depth") / "depth-anything-tiny"))


def test_depth_maps_follow_transformers_post_processing(depth_folder):
    model, processor = load_depth_model(depth_folder)
    image = torch.rand(2, 40, 72, 3)
    depth = estimate_depth(model, processor, image)
    assert depth.shape == (2, 40, 72)
    for i in range(2):
        assert depth[i].min() == 0.0 and depth[i].max() == 1.0  # each map stretched to [0, 1]
    with torch.no_grad():
        inputs = processor(images=[f.movedim(-1, 0) for f in image], return_tensors="pt", do_rescale=False)
        outputs = model(**inputs)
    reference = processor.post_process_depth_estimation(outputs, target_sizes=[(40, 72)] * 2)
    for i, item in enumerate(reference):
        d = item["predicted_depth"]
        torch.testing.assert_close(depth[i], (d - d.min()) / (d.max() - d.min()), rtol=1e-5, atol=1e-5)


def test_a_folder_without_a_model_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not is_depth_model_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json, \\*.safetensors weights"):
        load_depth_model(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_depth_model(str(tmp_path / "absent"))


def test_an_interrupt_stops_the_depth_model_between_layers_and_leaves_no_hooks(depth_folder):
    class Cancelled(Exception):
        pass

    calls = []

    def interrupt():
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled

    model, processor = load_depth_model(depth_folder)
    image = torch.rand(1, 40, 72, 3)
    before = estimate_depth(model, processor, image)
    with pytest.raises(Cancelled):
        estimate_depth(model, processor, image, interrupt)
    assert len(calls) == 2
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert torch.equal(estimate_depth(model, processor, image, lambda: None), before)
