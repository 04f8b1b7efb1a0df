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
