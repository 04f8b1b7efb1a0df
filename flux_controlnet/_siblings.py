"""The sibling pure packages this one builds on (flux_models, flux_sampler), imported in both contexts.

Inside ComfyUI the pack is one package (custom_nodes/fluxworks), so `__package__` is "<pack>.flux_controlnet"
and siblings are reached relatively; tests, devtools and bench scripts put the repository root on the path,
where they are top-level packages.
"""

# ruff: noqa: F401
if __package__ and "." in __package__:
    from ..flux_models import files
    from ..flux_models.dtypes import storage_and_compute
    from ..flux_models.transformer import FLUX1_AXES, backbone_fields
    from ..flux_models.transformer_keys import bfl_to_diffusers
    from ..flux_sampler.control import ControlResiduals
    from ..flux_sampler.latents import pack
else:
    from flux_models import files
    from flux_models.dtypes import storage_and_compute
    from flux_models.transformer import FLUX1_AXES, backbone_fields
    from flux_models.transformer_keys import bfl_to_diffusers
    from flux_sampler.control import ControlResiduals
    from flux_sampler.latents import pack
