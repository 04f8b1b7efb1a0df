"""Which held-out captions choose settings and which report results.

Settings (steps, guidance, T5 length, cache thresholds) picked as the best on a caption list score higher on
that list than they would on new captions, so a number measured on the list that picked them is optimistic.
The held-out captions (never trained on, see `training.shapes.is_held_out`) are therefore split once, by
position in one fixed list:

- validation: `held_out_captions(100, CAPTION_SEED)[:50]`. This is the list every earlier benchmark used (it is
  what `held_out_captions(50, CAPTION_SEED)` returns) and that chose the recommended settings, so it stays the
  list for choosing.
- test: `held_out_captions(100, CAPTION_SEED)[50:]`, used for reporting only. Do not tune anything on it.

Noise: caption i of either list is sampled from `make_noise(NOISE_SEED + i)`; the r-th extra seed per caption
(repeat r) from `NOISE_SEED + r * SEED_STRIDE + i`.
"""

from __future__ import annotations

from training.shapes import held_out_captions

CAPTION_SEED = 1234
SPLIT_SIZE = 50
NOISE_SEED = 1000
SEED_STRIDE = 1000  # larger than any split, so repeats never reuse a seed within a split
SPLITS = ("validation", "test")


def _held_out() -> list[str]:
    return held_out_captions(2 * SPLIT_SIZE, CAPTION_SEED)


def _first(captions: list[str], count: int, split: str) -> list[str]:
    if not 1 <= count <= SPLIT_SIZE:
        raise ValueError(f"the {split} split has {SPLIT_SIZE} captions; asked for {count} (use 1..{SPLIT_SIZE})")
    return captions[:count]


def validation_captions(count: int = SPLIT_SIZE) -> list[str]:
    """The first `count` captions of the validation split: for choosing settings."""
    return _first(_held_out()[:SPLIT_SIZE], count, "validation")


def test_captions(count: int = SPLIT_SIZE) -> list[str]:
    """The first `count` captions of the test split: for reporting only, never for choosing settings."""
    return _first(_held_out()[SPLIT_SIZE:], count, "test")


test_captions.__test__ = False  # a caption list, not a test for pytest to collect when imported into a test module


def split_captions(split: str, count: int = SPLIT_SIZE) -> list[str]:
    """`validation_captions(count)` or `test_captions(count)` by name."""
    if split == "validation":
        return validation_captions(count)
    if split == "test":
        return test_captions(count)
    raise ValueError(f"unknown caption split {split!r}; use one of {SPLITS}")


def noise_seeds(count: int, repeat: int = 0) -> list[int]:
    """Noise seeds of captions 0..count-1 for the `repeat`-th sample of each caption (0 = the first)."""
    if repeat < 0 or count > SEED_STRIDE:
        raise ValueError(f"repeat must be >= 0 and count <= {SEED_STRIDE}; got repeat={repeat}, count={count}")
    return [NOISE_SEED + repeat * SEED_STRIDE + i for i in range(count)]
