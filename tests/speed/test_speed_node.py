"""FluxWorksSpeed inside an in-process ComfyUI host (CPU): the fp8 options are optional inputs with the defaults
chosen on the H200 and the trained embedded model (docs/performance.md), and each choice reaches the prepared
runner's options."""

from __future__ import annotations

import importlib

import pytest

from tests.lora.conftest import flux, pack  # noqa: F401 - the shared in-process host and tiny model fixtures
from tests.lora.lora_helpers import make_patcher


def test_speed_node_defaults_to_tensorwise_and_passes_rowwise_on(pack, flux):  # noqa: F811
    speed = importlib.import_module("fluxworks.nodes.speed")
    spec = speed.FluxWorksSpeed.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "compile", "fp8_matmul", "attention"]  # saved widget order
    assert spec["optional"]["fp8_scaling"][0] == ["rowwise", "tensorwise"]
    assert spec["optional"]["fp8_scaling"][1]["default"] == "tensorwise"

    patcher = make_patcher(pack, flux)
    (defaults,) = speed.FluxWorksSpeed().apply(patcher, True, True, "auto")
    (rowwise,) = speed.FluxWorksSpeed().apply(patcher, True, True, "auto", fp8_scaling="rowwise")
    assert speed.speed_options(defaults).fp8_scaling == "tensorwise"
    assert speed.speed_options(rowwise).fp8_scaling == "rowwise"
    assert speed.speed_options(rowwise).fp8_matmul and speed.speed_options(rowwise).compile
    assert not speed.speed_options(patcher).fp8_matmul  # the input model keeps its own options


def test_speed_node_fp8_variants_are_optional(pack, flux):  # noqa: F811
    """Defaults: fast accumulation, calibrated activation scales (auto), untuned compile; each input reaches the
    prepared runner's options."""
    speed = importlib.import_module("fluxworks.nodes.speed")
    optional = speed.FluxWorksSpeed.INPUT_TYPES()["optional"]
    assert optional["fp8_fast_accum"][1]["default"] is True
    assert optional["fp8_activations"][0] == ["auto", "dynamic", "calibrated"]
    assert optional["fp8_activations"][1]["default"] == "auto"
    assert optional["tune_kernels"][1]["default"] is False

    patcher = make_patcher(pack, flux)
    (defaults,) = speed.FluxWorksSpeed().apply(patcher, True, True, "auto")
    options = speed.speed_options(defaults)
    assert (options.fp8_fast_accum, options.fp8_activations, options.tune_kernels) == (True, "calibrated", False)
    (chosen,) = speed.FluxWorksSpeed().apply(patcher, True, True, "auto", fp8_fast_accum=False,
                                            fp8_activations="dynamic", tune_kernels=True)
    options = speed.speed_options(chosen)
    assert (options.fp8_fast_accum, options.fp8_activations, options.tune_kernels) == (False, "dynamic", True)


@pytest.mark.parametrize("chosen, expected", [("auto", "dynamic"), ("dynamic", "dynamic")])
def test_auto_activations_are_dynamic_with_block_offload(pack, flux, chosen, expected):  # noqa: F811
    """Block offload streams each block's weights, which would lose calibrated scales: auto picks dynamic there,
    so turning offload on never needs a second change."""
    speed = importlib.import_module("fluxworks.nodes.speed")
    (offloaded,) = speed.FluxWorksSpeed().apply(make_patcher(pack, flux), False, True, "auto",
                                               fp8_activations=chosen, offload_resident_blocks=2)
    assert speed.speed_options(offloaded).fp8_activations == expected


def test_calibrated_activations_with_block_offload_are_refused(pack, flux):  # noqa: F811
    speed = importlib.import_module("fluxworks.nodes.speed")
    with pytest.raises(ValueError, match="calibrated fp8 activations cannot be combined with block offload"):
        speed.FluxWorksSpeed().apply(make_patcher(pack, flux), False, True, "auto", fp8_activations="calibrated",
                                     offload_resident_blocks=2)
