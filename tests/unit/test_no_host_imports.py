"""flux_sampler and flux_models must work without ComfyUI: import them with the host's modules blocked."""

import subprocess
import sys

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'comfy', 'folder_paths', 'nodes', 'server', 'latent_preview', 'execution'}:
            raise ImportError('host module imported: ' + name)
sys.meta_path.insert(0, Block())
import flux_sampler, flux_sampler.sampling, flux_sampler.schedule, flux_sampler.guidance, flux_sampler.latents
import flux_models.transformer, flux_models.text_encoders, flux_models.holders
print('ok')
"""


def test_pure_packages_import_without_comfyui():
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
