"""One ComfyUI server per test session, with the tiny models written into its models tree."""

from __future__ import annotations

import pytest

from devtools.comfy_server import ComfyServer
from devtools.tiny_models import write_models_tree


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyServer:
    server = ComfyServer(str(tmp_path_factory.mktemp("comfy")))
    server.model_names = write_models_tree(server.models_dir)
    server.start()
    yield server
    server.stop()
