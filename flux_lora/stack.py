"""The LORA_STACK value and the `rows` JSON of FluxWorksLoraStack.

A stack is a list of (lora_name, strength, text_strength) tuples: the convention of other packs' LoRA stackers
(Comfyroll, Efficiency: name, model strength, clip strength), so stacks chain across packs. Disabled rows are
left out of the list.
"""

from __future__ import annotations

import json

ROW_KEYS = {"lora", "strength", "enabled", "text_strength"}


def parse_rows(rows: str) -> list[tuple[str, float, float]]:
    """The `rows` widget (JSON list of {"lora", "strength", "enabled", "text_strength"}) -> enabled entries."""
    try:
        data = json.loads(rows) if rows.strip() else []
    except json.JSONDecodeError as exc:
        raise ValueError(f"rows is not valid JSON ({exc}); expected e.g. "
                         '[{"lora": "my_flux_lora.safetensors", "strength": 1.0, "enabled": true}]') from exc
    if not isinstance(data, list):
        raise ValueError(f"rows must be a JSON list of rows, got {type(data).__name__}")
    entries = []
    for i, row in enumerate(data):
        if not isinstance(row, dict) or not isinstance(row.get("lora"), str):
            raise ValueError(f"row {i} must be an object with a \"lora\" file name, got {row!r}")
        unknown = set(row) - ROW_KEYS
        if unknown:
            raise ValueError(f"row {i} has unknown keys {sorted(unknown)}; allowed: {sorted(ROW_KEYS)}")
        strength = row.get("strength", 1.0)
        text_strength = row.get("text_strength", strength)
        enabled = row.get("enabled", True)
        for name, value in (("strength", strength), ("text_strength", text_strength)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"row {i} ({row['lora']}): {name} must be a number, got {value!r}")
        if not isinstance(enabled, bool):
            raise ValueError(f"row {i} ({row['lora']}): enabled must be true or false, got {enabled!r}")
        if enabled:
            entries.append((row["lora"], float(strength), float(text_strength)))
    return entries


def check_stack(stack) -> list[tuple[str, float, float]]:
    """A LORA_STACK from any pack, checked; "None" entries (empty slots of Comfyroll stacks) are dropped."""
    if not isinstance(stack, (list, tuple)):
        raise TypeError(f"lora_stack must be a LORA_STACK list, got {type(stack).__name__}")
    out = []
    for entry in stack:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)):
            raise TypeError(f"LORA_STACK entries are (lora_name, strength, text_strength); got {entry!r}")
        if entry[0] != "None":
            out.append((entry[0], float(entry[1]), float(entry[2])))
    return out
