"""GPU speed and memory for FLUX.1: a block-by-block runner (step cache, block offload), fp8 matmul
linears, regional compile and attention-backend selection. Pure torch + diffusers; no ComfyUI imports."""
