"""LoRA-family adapters for FLUX.1 in every common file format, converted onto our diffusers module names.

Pure torch + safetensors: nothing here imports ComfyUI. `nodes/lora.py` turns the converted deltas into
ComfyUI weight patches.
"""

from .adapters import Dense, Hadamard, Kronecker, LowRank, RowSlice, add_deltas, summed_delta
from .convert import ConvertedLora, LoraMismatchError, Unmatched, convert_lora
from .files import LoraFile, read_lora_file
from .targets import RouteTable, linear_shapes

__all__ = [
    "ConvertedLora", "Dense", "Hadamard", "Kronecker", "LoraFile", "LoraMismatchError", "LowRank", "RouteTable",
    "RowSlice", "Unmatched", "add_deltas", "convert_lora", "linear_shapes", "read_lora_file", "summed_delta",
]
