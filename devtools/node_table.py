"""Print the README's node table from a live ComfyUI server's /object_info (so the table cannot drift).

Usage: python -m devtools.node_table > /tmp/nodes.md
"""

from __future__ import annotations

import tempfile

from devtools.comfy_server import ComfyServer


def _describe(name: str, spec) -> str:
    kind = spec[0]
    if isinstance(kind, list):
        kind = "choice"
    extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    default = extra.get("default")
    return f"`{name}` ({kind}{'' if default in (None, '') else ', ' + repr(default)})"


def table(info: dict) -> str:
    rows = ["| Node (id) | Inputs (type, default) | Outputs | What it does |", "|---|---|---|---|"]
    for node_id in sorted(k for k in info if k.startswith("FluxWorks")):
        node = info[node_id]
        inputs = []
        for group in ("required", "optional"):
            for name, spec in node["input"].get(group, {}).items():
                text = _describe(name, spec)
                inputs.append(text + (" *optional*" if group == "optional" else ""))
        outputs = ", ".join(node["output"])
        rows.append(f"| **{node['display_name']}** (`{node_id}`) | {'; '.join(inputs)} | {outputs} | "
                    f"{node.get('description', '')} |")
    return "\n".join(rows)


def main() -> None:
    with tempfile.TemporaryDirectory() as root:
        server = ComfyServer(root)
        server.start()
        try:
            print(table(server.get_json("/object_info")))  # noqa: T201 - the table is the output
        finally:
            server.stop()


if __name__ == "__main__":
    main()
