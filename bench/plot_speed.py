"""Plot ms/step per mode from a speed_bench.py JSON next to the diffusers and ComfyUI baselines.

Usage: python bench/plot_speed.py docs/bench/speed_h200_2026-11-26.json docs/performance_ms_per_step.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "comfy_bf16": "ComfyUI native bf16",
    "comfy_fp8_fast": "ComfyUI fp8_e4m3fn_fast",
    "diffusers_eager": "diffusers eager bf16",
    "ours_eager_bf16": "FluxWorks eager bf16",
    "ours_bf16_attn_compile": "FluxWorks bf16 + compile",
    "ours_fp8_attn_compile": "FluxWorks fp8 rowwise + compile",
    "ours_fp8_tensorwise_attn_compile": "FluxWorks fp8 tensorwise + compile",
    "ours_fp8_cap16gib": "FluxWorks fp8, 16 GiB cap",
    "ours_fp8_cap8gib": "FluxWorks fp8, 8 GiB cap (offload)",
    "ours_fp8_compile_cache0.6": "FluxWorks fp8 + compile + step cache",  # JSON files before cache_rows
}
MODE_NAMES = {"ours_fp8_attn_compile": "fp8 rowwise", "ours_fp8_tensorwise_attn_compile": "fp8 tensorwise"}


def cache_labels(data: dict) -> list[tuple[str, float]]:
    """One bar per step-cache row: its mode, threshold and how many steps it reused."""
    rows = []
    for row in data.get("cache_rows", []):
        if "ms_per_step" in row:
            label = (f"FluxWorks {MODE_NAMES.get(row['mode'], row['mode'])} + compile + cache "
                     f"t={row['threshold']:g} ({row['steps_reused']}/{row['steps']} reused)")
            rows.append((label, row["ms_per_step"]))
    return rows


def main(src: str, dst: str) -> None:
    data = json.load(open(src))
    rows = [(LABELS[k], data[k + "_ms_per_step"]) for k in LABELS if k + "_ms_per_step" in data] + cache_labels(data)
    colors = ["#888888" if not label.startswith("FluxWorks") else "#2a7fd4" for label, _ in rows]
    fig, ax = plt.subplots(figsize=(9, 2.0 + 0.3 * len(rows)))
    ax.barh([r[0] for r in rows], [r[1] for r in rows], color=colors)
    for i, (_, v) in enumerate(rows):
        ax.text(v + 2, i, f"{v:.0f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per step (lower is better)")
    ax.set_title(f"FLUX.1-dev 12B, {data['res']}², {data['steps']} steps, {data['device']} ({data['date']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
