"""LoRA training of FLUX.1 transformers (diffusers `FluxTransformer2DModel` + peft), with no ComfyUI import:
timestep sampling and the flow-matching loss as diffusers' `train_dreambooth_lora_flux.py` computes them, cached
datasets, the optimisation loop with checkpoints, and LoRA files in that script's layout.

`nodes/training.py` drives it from ComfyUI; `training/train_embedded_lora.py` uses the same loop.
"""

from .data import CachedDataset, TrainingBatch
from .lora import LORA_LAYERS, lora_config, lora_target_modules, save_lora, training_adapter
from .memory import TrainingMemory, estimate_training_memory
from .timesteps import TIMESTEP_SAMPLING, sample_sigmas
from .trainer import LoraTrainer, TrainSettings

__all__ = [
    "LORA_LAYERS", "TIMESTEP_SAMPLING", "CachedDataset", "LoraTrainer", "TrainSettings", "TrainingBatch",
    "TrainingMemory", "estimate_training_memory", "lora_config", "lora_target_modules", "sample_sigmas", "save_lora",
    "training_adapter",
]
