"""The LORA_STACK value and the `rows` JSON of FluxWorksLoraStack.

A stack is a list of (lora_name, strength, text_strength) tuples: the convention of other packs' LoRA stackers
(Comfyroll, Efficiency: name, model strength, clip strength), so stacks chain across packs. Disabled rows are
left out of the list.
"""

from __future__ import annotations

import json
import math

ROW_KEYS = {"lora", "strength", "enabled", "text_strength"}
# A strength scales the LoRA's delta on every patched weight: usual values lie within -2..2, and anything near
# this bound already swamps the model's own weights. Beyond it (1e30, inf) the merged weights overflow to a black
# or noise image, so such values are refused rather than applied.
MAX_STRENGTH = 100.0
STRENGTH_RANGE = f"LoRA strengths are usually between -2 and 2; FluxWorks accepts -{MAX_STRENGTH:g} to {MAX_STRENGTH:g}"


def _refuse_constant(name: str):
    """json.loads' parse_constant hook: Python's json reads NaN/Infinity/-Infinity, which JSON does not have."""
    raise ValueError(f"rows holds {name}, which is not a number in JSON (and no usable LoRA strength): write a "
                     f"finite strength such as 1.0; {STRENGTH_RANGE}")


def check_strength(value, what: str) -> float:
    """A strength as float, or ValueError naming `what` (row, file and field), the value and the usable range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float
        number = math.inf
    if not math.isfinite(number) or abs(number) > MAX_STRENGTH:
        shown = repr(value) if len(repr(value)) <= 32 else f"{repr(value)[:12]}... ({len(repr(value))} digits)"
        raise ValueError(f"{what} is {shown}: {STRENGTH_RANGE}")
    return number


def parse_rows(rows: str) -> list[tuple[str, float, float]]:
    """The `rows` widget (JSON list of {"lora", "strength", "enabled", "text_strength"}) -> enabled entries."""
    try:
        data = json.loads(rows, parse_constant=_refuse_constant) if rows.strip() else []
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
        strength = check_strength(strength, f"row {i} ({row['lora']}): strength")
        text_strength = check_strength(text_strength, f"row {i} ({row['lora']}): text_strength")
        if not isinstance(enabled, bool):
            raise ValueError(f"row {i} ({row['lora']}): enabled must be true or false, got {enabled!r}")
        if enabled:
            entries.append((row["lora"], strength, text_strength))
    return entries


def check_stack(stack) -> list[tuple[str, float, float]]:
    """A LORA_STACK from any pack, checked; "None" entries (empty slots of Comfyroll stacks) are dropped."""
    if not isinstance(stack, (list, tuple)):
        raise TypeError(f"lora_stack must be a LORA_STACK list, got {type(stack).__name__}")
    out = []
    for i, entry in enumerate(stack):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], str)):
            raise TypeError(f"LORA_STACK entries are (lora_name, strength, text_strength); got {entry!r}")
        if entry[0] != "None":
            out.append((entry[0], check_strength(entry[1], f"lora_stack entry {i} ({entry[0]}): strength"),
                        check_strength(entry[2], f"lora_stack entry {i} ({entry[0]}): text_strength")))
    return out
