"""The example workflows: each UI-format file converts to its API copy, and every value is one the server accepts."""

from __future__ import annotations

import io
import urllib.request

import pytest
from PIL import Image

from tests.e2e.ui_workflows import (
    copy_example_inputs,
    input_names,
    input_spec,
    load_api,
    load_ui,
    ui_to_api,
    widget_values,
    with_model_names,
    workflow_names,
)

pytestmark = pytest.mark.e2e

EXPECTED = {"flux_dev_text_to_image", "flux_schnell_text_to_image", "flux_dev_true_cfg_negative",
            "flux_dev_img2img", "core_model_scheduled_guidance"}


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    copy_example_inputs(comfy_server.input_dir)  # LoadImage lists what is in input/ when /object_info is asked
    return comfy_server.get_json("/object_info")


def value_problems(node_id: str, class_type: str, name: str, value, kind: str, options: dict) -> list[str]:
    where = f"node {node_id} ({class_type}).{name} = {value!r}"
    if kind == "COMBO":
        return [] if value in options["options"] else [f"{where}: not one of {options['options']}"]
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    if isinstance(value, bool) != (kind == "BOOLEAN") or not isinstance(value, expected):
        return [f"{where}: expected {kind}"]
    if kind in ("INT", "FLOAT"):
        low, high = options.get("min", float("-inf")), options.get("max", float("inf"))
        if not low <= value <= high:
            return [f"{where}: outside [{low}, {high}]"]
    return []


def prompt_problems(prompt: dict, object_info: dict) -> list[str]:
    """Everything in an API-format prompt that /prompt validation or the node would reject."""
    problems = []
    for node_id, node in prompt.items():
        info = object_info[node["class_type"]]
        for name, required in input_names(info):
            kind, options = input_spec(info, name)
            value = node["inputs"].get(name)
            if value is None:
                if required:
                    problems.append(f"node {node_id} ({node['class_type']}): required input {name!r} missing")
            elif isinstance(value, list):
                source = prompt.get(value[0])
                if source is None:
                    problems.append(f"node {node_id}.{name} links to missing node {value[0]}")
                    continue
                produced = object_info[source["class_type"]]["output"][value[1]]
                if produced != kind and "*" not in (produced, kind):
                    problems.append(f"node {node_id}.{name} ({kind}) is fed {produced} by node {value[0]}")
            else:
                problems += value_problems(node_id, node["class_type"], name, value, kind, options)
        unknown = set(node["inputs"]) - {n for n, _ in input_names(info)}
        if unknown:
            problems.append(f"node {node_id} ({node['class_type']}) has unknown inputs {sorted(unknown)}")
    return problems


def test_every_example_exists_in_both_formats():
    assert EXPECTED <= set(workflow_names())
    for name in workflow_names():
        assert load_ui(name)["version"] == 0.4
        assert load_api(name), name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_ui_workflow_converts_to_its_api_copy(name, object_info):
    assert ui_to_api(load_ui(name), object_info) == load_api(name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_value_is_valid_for_the_server(name, comfy_server, object_info):
    workflow = load_ui(name)
    for node in workflow["nodes"]:  # positional values line up with the widgets the server declares
        widget_values(node, object_info[node["type"]])
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, kind in workflow["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == kind, f"link {link_id}"
        assert nodes[dst]["inputs"][dst_slot]["type"] == kind, f"link {link_id}"
        assert link_id in nodes[src]["outputs"][src_slot]["links"] and nodes[dst]["inputs"][dst_slot]["link"] == link_id
    prompt = with_model_names(load_api(name), comfy_server.model_names)
    assert prompt_problems(prompt, object_info) == []


def test_comfyui_lists_the_examples_as_templates(comfy_server):
    templates = comfy_server.get_json("/workflow_templates")
    [pack] = [p for p, names in templates.items() if EXPECTED <= set(names)]
    assert sorted(templates[pack]) == workflow_names()  # api/ copies are not offered as templates
    for name in workflow_names():
        assert comfy_server.get_json(f"/api/workflow_templates/{pack}/{name}.json") == load_ui(name)
        # The templates browser shows <name>.jpg as each workflow's thumbnail.
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/{pack}/{name}.jpg", timeout=30) as r:
            assert Image.open(io.BytesIO(r.read())).format == "JPEG", name
