"""Loading FLUX.1 weights as people have them: key layouts, shape-inferred configs, dtype policy.

Imports neither ComfyUI nor anything that fetches from a hub; every file is read with safetensors.
"""
