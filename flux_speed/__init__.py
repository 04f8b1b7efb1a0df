"""GPU speed and memory for FLUX.1 around diffusers' own transformer forward: the prepared transformer the
sampler calls (prepare.py), the step cache and block offload as diffusers hooks, fp8 matmul linears, regional
compile and attention-backend selection. Pure torch + diffusers; no ComfyUI imports."""
