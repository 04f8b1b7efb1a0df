"""Several GPUs for one FluxWorks Sampler run: persistent worker processes, one per device, each holding the
transformer, driven by the ComfyUI server process (which itself stays on one GPU or none).

Two modes: "split image" runs one image on all workers with diffusers' own context parallelism (Ulysses, or
ring attention where the head count does not divide), "spread batch" gives each worker its share of the batch.
Pure torch + diffusers; no ComfyUI imports (the node and the host feed it the weights and report progress)."""
