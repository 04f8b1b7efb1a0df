"""evaluation.regional's placement ceiling (`vae_round_trip`): the layout's own render through the embedded VAE, scored
per region like the samplers. docs/regional.md compares the samplers with its test-split figure (90.2 %); here it
runs on 4 validation layouts and must place nearly every region, while the same layouts rendered with every object
in another cell must place none."""

from __future__ import annotations

import dataclasses

import numpy as np

from evaluation.regional import CEILING, RegionalBench, layouts, run, score_regions
from training.shapes import POSITIONS, Scene, render


def test_the_round_trip_of_the_asked_layout_places_its_regions(embedded_pipeline):
    bench = RegionalBench(embedded_pipeline)
    items = layouts("validation", 4)
    result = run(bench, items, 1, CEILING)
    assert result["regions"] >= 8 and result["leak"] == 0.0
    assert result["placement"] >= 0.75  # 0.90 over the 244 test regions; shapes the VAE loses are misses

    for layout in items:
        free = [p for p in POSITIONS if p not in {o.position for o in layout.objects}]
        moved = Scene(tuple(dataclasses.replace(o, position=free[i]) for i, o in enumerate(layout.objects)),
                      layout.scene.background)
        image = embedded_pipeline.reconstruct(render(moved, np.random.default_rng(0))[None])[0]
        assert not any(row["placement"] for row in score_regions(image, layout)), layout.caption
