"""FluxWorksSpeed inside an in-process ComfyUI host (CPU): the fp8 scaling choice is optional, so saved
workflows keep today's rowwise behaviour, and choosing tensorwise reaches the prepared runner's options."""

from __future__ import annotations

import importlib

from tests.lora.conftest import flux, pack  # noqa: F401 - the shared in-process host and tiny model fixtures
from tests.lora.lora_helpers import make_patcher


def test_speed_node_defaults_to_rowwise_and_passes_tensorwise_on(pack, flux):  # noqa: F811
    speed = importlib.import_module("fluxworks.nodes.speed")
    spec = speed.FluxWorksSpeed.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "compile", "fp8_matmul", "attention"]  # saved widget order
    assert spec["optional"]["fp8_scaling"][0] == ["rowwise", "tensorwise"]
    assert spec["optional"]["fp8_scaling"][1]["default"] == "rowwise"

    patcher = make_patcher(pack, flux)
    (saved_workflow,) = speed.FluxWorksSpeed().apply(patcher, True, True, "auto")
    (tensorwise,) = speed.FluxWorksSpeed().apply(patcher, True, True, "auto", fp8_scaling="tensorwise")
    assert speed.speed_options(saved_workflow).fp8_scaling == "rowwise"
    assert speed.speed_options(tensorwise).fp8_scaling == "tensorwise"
    assert speed.speed_options(tensorwise).fp8_matmul and speed.speed_options(tensorwise).compile
    assert speed.speed_options(patcher).fp8_scaling == "rowwise"  # the input model keeps its own options


def test_speed_node_fp8_variants_are_optional_with_lossless_defaults(pack, flux):  # noqa: F811
    """Saved workflows get dynamic scales, fast accumulation (same final-latent error on the H200) and untuned
    compile; each new input reaches the prepared runner's options."""
    speed = importlib.import_module("fluxworks.nodes.speed")
    optional = speed.FluxWorksSpeed.INPUT_TYPES()["optional"]
    assert optional["fp8_fast_accum"][1]["default"] is True
    assert optional["fp8_activations"][0] == ["dynamic", "calibrated"]
    assert optional["fp8_activations"][1]["default"] == "dynamic"
    assert optional["tune_kernels"][1]["default"] is False

    patcher = make_patcher(pack, flux)
    (saved_workflow,) = speed.FluxWorksSpeed().apply(patcher, True, True, "auto")
    options = speed.speed_options(saved_workflow)
    assert (options.fp8_fast_accum, options.fp8_activations, options.tune_kernels) == (True, "dynamic", False)
    (chosen,) = speed.FluxWorksSpeed().apply(patcher, True, True, "auto", fp8_fast_accum=False,
                                            fp8_activations="calibrated", tune_kernels=True)
    options = speed.speed_options(chosen)
    assert (options.fp8_fast_accum, options.fp8_activations, options.tune_kernels) == (False, "calibrated", True)
