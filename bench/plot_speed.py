"""Plot ms/step per mode from a speed_bench.py JSON next to the diffusers and ComfyUI baselines.

Usage: python bench/plot_speed.py docs/bench/speed_h200_2026-11-26.json docs/performance_ms_per_step.png
(needs matplotlib, which is not a FluxWorks requirement: pip install matplotlib). Reads the keys of both the
current speed_bench.py and the JSON files written before it ran every row through `prepare` (comfy_fp8_fast,
ours_fp8_compile_cache0.6).
"""

from __future__ import annotations

import json
import sys

LABELS = {
    "comfy_bf16": "ComfyUI core bf16 (plain comfy.sample)",
    "comfy_fp8_fast": "ComfyUI fp8_e4m3fn_fast",  # JSON files before node_bench took over core's modes
    "diffusers_eager": "diffusers eager bf16",
    "ours_eager_bf16": "FluxWorks eager bf16",
    "ours_bf16_attn_compile": "FluxWorks bf16 + compile",
    "ours_fp8_attn_compile": "FluxWorks fp8 rowwise + compile",
    "ours_fp8_tensorwise_attn_compile": "FluxWorks fp8 tensorwise + compile",
    "ours_fp8_cap16gib": "FluxWorks fp8, 16 GiB cap",
    "ours_fp8_cap8gib": "FluxWorks fp8, 8 GiB cap (offload)",
    "ours_node_fp8_offload_cap8gib": "FluxWorks Speed defaults + offload, 8 GiB cap",
    "ours_fp8_compile_cache0.6": "FluxWorks fp8 + compile + step cache",  # JSON files before cache_rows
}
MODE_NAMES = {"ours_fp8_attn_compile": "fp8 rowwise", "ours_fp8_tensorwise_attn_compile": "fp8 tensorwise",
              "ours_bf16_attn_compile": "bf16"}


def cache_labels(data: dict) -> list[tuple[str, float]]:
    """One bar per step-cache row: its mode, threshold and how many steps it reused."""
    rows = []
    for row in data.get("cache_rows", []):
        if "ms_per_step" in row:
            label = (f"FluxWorks {MODE_NAMES.get(row['mode'], row['mode'])} + compile + cache "
                     f"t={row['threshold']:g} ({row['steps_reused']}/{row['steps']} reused)")
            rows.append((label, row["ms_per_step"]))
    return rows


def bars(data: dict) -> list[tuple[str, float]]:
    """(label, ms/step) per bar, in LABELS order, then the step-cache rows."""
    return [(LABELS[k], data[k + "_ms_per_step"]) for k in LABELS if k + "_ms_per_step" in data] + cache_labels(data)


def main(src: str, dst: str) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise SystemExit("plot_speed needs matplotlib (not a FluxWorks requirement): pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(src, encoding="utf-8") as f:
        data = json.load(f)
    rows = bars(data)
    if not rows:
        raise SystemExit(f"{src} has no *_ms_per_step row this plot knows ({', '.join(LABELS)}) and no cache_rows: "
                         "is it a speed_bench.py report (flux_speed.json)?")
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
    if len(sys.argv) != 3:
        raise SystemExit("usage: python bench/plot_speed.py SPEED_BENCH.json OUT.png")
    main(sys.argv[1], sys.argv[2])
