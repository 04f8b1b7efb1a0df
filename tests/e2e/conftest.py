"""A second ComfyUI server for the e2e tests, as a user's first hour has it: no model files at all, so the only
models it lists are the pack's embedded ones (tests/conftest.py's server holds the tiny random test models)."""

from __future__ import annotations

import pytest

from devtools.comfy_server import ComfyServer
from devtools.embedded_examples import embedded_only_server


@pytest.fixture(scope="session")
def embedded_server(tmp_path_factory) -> ComfyServer:
    server = embedded_only_server(str(tmp_path_factory.mktemp("comfy_embedded_only")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def embedded_object_info(embedded_server) -> dict:
    return embedded_server.get_json("/object_info")
