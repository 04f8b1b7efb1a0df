"""Regional variant study (issue 12, validation split): region texts HIDDEN where the shipped sampler leaves the
text stream unmasked. Not a node option: this script patches `flux_sampler.regional` for its own run only, to test
whether the region texts that every image token reads outside the mask's window and blocks help or hurt.

- `"outside": "hide"`: outside the mask window, a mask under which no image or global-text token attends to a region
  text (each region text sees only itself): exactly the global caption for the image stream;
- `"other_blocks": "hide"`: inside the window, the same mask on the blocks that do not get the regional mask;
- `"end"`, `"blocks"`: the RegionalSettings window end and block set (default 0.5, "double", as shipped).

Result (docs/bench/regional_validation_hidden_texts_2026-12-01.json, docs/regional.md): hiding raises adherence and
removes leaks but lowers placement, so the shipped sampler keeps the texts visible there.

    OMP_NUM_THREADS=1 python -m evaluation.regional_hidden_texts --out out.json \\
        --variants '[{}, {"outside": "hide"}, {"outside": "hide", "other_blocks": "hide"}]'
"""

from __future__ import annotations

import argparse
import json
from unittest import mock

import torch

from fluxworks.flux_sampler import regional as R

from .embedded import EmbeddedPipeline
from .regional import RegionalBench, layouts, run


def hidden_texts_mask(global_length: int, region_lengths: tuple[int, ...], image: int,
                      device: torch.device) -> torch.Tensor:
    """(L, L) bool over [global | regions | image]: global text and image tokens attend to each other freely and
    never to a region text; each region text attends only to itself."""
    text = global_length + sum(region_lengths)
    allowed = torch.zeros(text + image, text + image, dtype=torch.bool, device=device)
    allowed[:global_length, :global_length] = True
    allowed[:global_length, text:] = True
    allowed[text:, :global_length] = True
    allowed[text:, text:] = True
    start = global_length
    for size in region_lengths:
        allowed[start:start + size, start:start + size] = True
        start += size
    return allowed


class Variant:
    """The patched methods for one variant (`outside`, `other_blocks`: "hide" or "plain")."""

    def __init__(self, outside: str = "plain", other_blocks: str = "plain") -> None:
        self.outside, self.other_blocks = outside, other_blocks

    def joint_attention_kwargs(self_variant):  # noqa: N805 - returns the method bound to this variant
        def method(self, transformer, position, latent_h, latent_w, dtype):
            device = next(transformer.parameters()).device
            double, single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
            hidden = hidden_texts_mask(self.global_length, self.region_lengths, (latent_h // 2) * (latent_w // 2),
                                       device)[None, None]
            if not position.within(self.settings.start_percent, self.settings.end_percent):
                if self_variant.outside != "hide":
                    return None
                return {"attention_mask": hidden, R.MASK_BLOCKS_KEY: frozenset(range(double + single)),
                        "fallback": None}
            return {"attention_mask": self.attention_mask(latent_h, latent_w, device, dtype),
                    R.MASK_BLOCKS_KEY: self.settings.block_indices(double, single),
                    "fallback": hidden if self_variant.other_blocks == "hide" else None}
        return method


def _router_pre_forward(self, module, *args, **kwargs):
    extra = kwargs.get("joint_attention_kwargs")
    if extra and R.MASK_BLOCKS_KEY in extra:
        extra = dict(extra)
        self.state.blocks = extra.pop(R.MASK_BLOCKS_KEY)
        self.state.mask = extra.pop("attention_mask")
        self.state.fallback = extra.pop("fallback", None)
        kwargs["joint_attention_kwargs"] = extra or None
    else:
        self.state.mask, self.state.blocks, self.state.fallback = None, frozenset(), None
    return args, kwargs


def _block_pre_forward(self, module, *args, **kwargs):  # CPU study: the native backend takes masks
    mask = self.state.mask if self.state.mask is not None and self.index in self.state.blocks else \
        getattr(self.state, "fallback", None)
    if mask is not None:
        kwargs["joint_attention_kwargs"] = {**(kwargs.get("joint_attention_kwargs") or {}), "attention_mask": mask}
    return args, kwargs


def main() -> None:
    from tests.paths import tokenizer_folders

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default='[{}, {"outside": "hide"}]', help="JSON list (module docstring)")
    parser.add_argument("--split", default="validation", choices=("validation", "test"))
    parser.add_argument("--count", type=int, default=36)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    bench = RegionalBench(EmbeddedPipeline.load(tokenizer_folders()))
    items = layouts(args.split, args.count)
    rows = []
    for v in json.loads(args.variants):
        variant = Variant(v.get("outside", "plain"), v.get("other_blocks", "plain"))
        settings = R.RegionalSettings(0.0, v.get("end", 0.5), v.get("blocks", "double"))
        with mock.patch.object(R.RegionalConditioning, "joint_attention_kwargs", variant.joint_attention_kwargs()), \
                mock.patch.object(R._Router, "pre_forward", _router_pre_forward), \
                mock.patch.object(R._BlockMask, "pre_forward", _block_pre_forward):
            result = run(bench, items, args.seeds, "regional", settings)
        rows.append({"variant": v, **{k: result[k] for k in ("placement", "placement_colour", "leak",
                                                              "layouts_all_placed_no_leak", "adherence", "regions",
                                                              "seconds")}})
        print(json.dumps(rows[-1]), flush=True)  # noqa: T201
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
