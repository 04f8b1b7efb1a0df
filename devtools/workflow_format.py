"""The ComfyUI workflow formats and the frontend's UI -> API conversion, redone from `/object_info`.

UI format (what the ComfyUI frontend saves, version 0.4): nodes with positional `widgets_values` and links
`[id, from_node, from_slot, to_node, to_slot, type]`. API format (what `POST /prompt` takes): inputs by name.
The widget order is the node's `input_order`, skipping socket-only inputs, plus the entries the frontend adds:
"control_after_generate" after an INT seed, "upload" after an image-upload combo.

Used by the e2e tests (a shipped UI workflow must convert to exactly its API copy) and by
`devtools/embedded_examples.py`, which writes the embedded-model examples in both formats.
"""

from __future__ import annotations

import copy

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})


def input_spec(node_info: dict, name: str) -> tuple[str, dict]:
    """(type, options) of input `name`; a combo's type is "COMBO" with its choices in options["options"]."""
    for section in ("required", "optional"):
        spec = node_info["input"].get(section, {}).get(name)
        if spec is not None:
            options = dict(spec[1]) if len(spec) > 1 else {}
            if isinstance(spec[0], list):
                return "COMBO", {**options, "options": spec[0]}
            return spec[0], options
    raise KeyError(f"{node_info['name']} has no input {name!r}")


def input_names(node_info: dict) -> list[tuple[str, bool]]:
    """(name, required) for every input in the order the node declares them."""
    order = node_info["input_order"]
    return [(n, True) for n in order.get("required", [])] + [(n, False) for n in order.get("optional", [])]


def widget_names(node_info: dict) -> list[str]:
    """The names behind each position of a UI-format node's `widgets_values`, as the frontend lays them out."""
    names = []
    for name, _ in input_names(node_info):
        kind, options = input_spec(node_info, name)
        if kind not in WIDGET_TYPES or options.get("forceInput"):
            continue
        names.append(name)
        control = options.get("control_after_generate")
        if kind == "INT" and (control if control is not None else name in ("seed", "noise_seed")):
            names.append("control_after_generate")
        elif kind == "COMBO" and control:
            raise ValueError(f"{node_info['name']}.{name}: combo widgets with control_after_generate are not handled")
        if kind == "COMBO" and options.get("image_upload"):
            names.append("upload")
    return names


def _node_info(object_info: dict, node: dict) -> dict:
    info = object_info.get(node["type"])
    if info is None:
        raise ValueError(f"node {node['id']}: node type {node['type']!r} is not in /object_info (pack not loaded?)")
    return info


def widget_values(node: dict, node_info: dict) -> dict:
    """A UI-format node's widgets_values by widget name."""
    names = widget_names(node_info)
    values = node.get("widgets_values") or []
    if isinstance(values, dict) or len(values) != len(names):
        raise ValueError(f"node {node['id']} ({node['type']}): widgets_values {values!r} do not match the "
                         f"widgets {names} that /object_info declares")
    return dict(zip(names, values, strict=True))


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt the frontend's "Queue" builds from a UI-format workflow (active nodes only)."""
    if workflow.get("version") != 0.4:
        raise ValueError(f"expected a UI-format workflow version 0.4, got version {workflow.get('version')!r}")
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({node['type']}) is muted or bypassed (mode {node['mode']}): "
                             "only active nodes are converted")
        info = _node_info(object_info, node)
        widgets = widget_values(node, info)
        linked = {slot["name"]: links[slot["link"]] for slot in node.get("inputs", []) if slot.get("link") is not None}
        inputs = {}
        for name, required in input_names(info):
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif name in widgets:
                inputs[name] = widgets[name]
            elif required:
                raise ValueError(f"node {node['id']} ({node['type']}): required input {name!r} is not connected")
        title = node.get("title") or info.get("display_name") or node["type"]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    return prompt


def set_values(workflow: dict, class_type: str, values: dict, object_info: dict | None = None) -> dict:
    """A copy of a workflow with widget `values` set on every node of `class_type` (UI format needs object_info)."""
    out = copy.deepcopy(workflow)
    if "nodes" in out:
        if object_info is None:
            raise ValueError("setting values in a UI-format workflow needs /object_info for the widget order")
        nodes = [n for n in out["nodes"] if n["type"] == class_type]
        for node in nodes:
            names = widget_names(_node_info(object_info, node))
            for name, value in values.items():
                if name not in names:
                    raise KeyError(f"{class_type} has no widget {name!r}; its widgets are {names}")
                node["widgets_values"][names.index(name)] = value
    else:
        nodes = [n for n in out.values() if n["class_type"] == class_type]
        for node in nodes:
            unknown = set(values) - set(node["inputs"])
            if unknown:
                raise KeyError(f"{class_type} has no inputs {sorted(unknown)}; it has {sorted(node['inputs'])}")
            node["inputs"].update(values)
    if not nodes:
        raise KeyError(f"the workflow has no {class_type} node")
    return out
