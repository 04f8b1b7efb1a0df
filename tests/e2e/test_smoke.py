import numpy as np
import pytest

pytestmark = pytest.mark.e2e


def test_every_fluxworks_node_is_registered(comfy_server):
    info = comfy_server.get_json("/object_info")
    expected = {"FluxWorksModelLoader", "FluxWorksTextEncoderLoader", "FluxWorksTextEncode",
                "FluxWorksGuidanceSchedule", "FluxWorksSampler", "FluxWorksScheduleCoreModel"}
    assert expected <= set(info)
    assert comfy_server.model_names["dev"] in info["FluxWorksModelLoader"]["input"]["required"]["model_name"][0]
    assert "flux1-dev-tiny-diffusers" in info["FluxWorksModelLoader"]["input"]["required"]["model_name"][0]


def test_text_to_image_through_the_api(comfy_server):
    names = comfy_server.model_names
    prompt = {
        "1": {"class_type": "FluxWorksModelLoader", "inputs": {"model_name": names["dev"], "weight_dtype": "default"}},
        "2": {"class_type": "FluxWorksTextEncoderLoader",
              "inputs": {"t5_name": names["t5"], "clip_name": names["clip_l"], "weight_dtype": "default"}},
        "3": {"class_type": "FluxWorksTextEncode", "inputs": {"text_encoder": ["2", 0], "prompt": "a red circle",
                                                              "clip_prompt": "", "max_sequence_length": "256"}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "5": {"class_type": "FluxWorksSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0],
                                                           "latent_image": ["4", 0], "seed": 3, "steps": 3,
                                                           "guidance": 3.5, "shift": 0.0, "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": names["vae"]}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "smoke"}},
    }
    progress = []
    result = comfy_server.run(prompt, on_message=lambda s, m: m["type"] == "progress" and progress.append(m))
    assert result.status == "success", result.messages
    [image] = comfy_server.images(result)
    assert image.size == (64, 48)
    assert np.asarray(image).std() > 1.0
    assert [m["data"]["value"] for m in progress if m["data"]["node"] == "5"] == [1, 2, 3]
