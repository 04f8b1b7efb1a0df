"""Entry script of one worker process (run as `python bootstrap.py PACKAGE PACK_DIR`, by pool.WorkerPool).

Why a script and not `multiprocessing`'s spawn: inside ComfyUI the pack is imported under a module name made from
its folder path (ComfyUI names custom nodes by path, with "." replaced), and spawn re-runs the server's `__main__`
(ComfyUI's main.py) in every child before it can even find the target. Here the child imports nothing of ComfyUI:
it registers the pack as a package under the server's exact module name without running the pack's `__init__`
(which registers nodes and needs ComfyUI), so the worker code and every pickled class in the messages (speed
options, conditioning) resolve to the same module names on both sides.

Handshake: the script listens on a loopback port with the authentication key from the environment
(FLUXWORKS_WORKER_KEY, hex), writes the port as one line on stdout, then points its stdout at stderr (nobody reads
the pipe after that line) and accepts two connections from the server: messages, then cancel requests.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from multiprocessing.connection import Listener


def register_package(name: str, folder: str) -> None:
    """Make `name` an importable package rooted at `folder` without executing its __init__.py."""
    package = types.ModuleType(name)
    package.__path__ = [folder]
    package.__package__ = name
    package.__file__ = os.path.join(folder, "__init__.py")
    sys.modules[name] = package


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit("usage: bootstrap.py PACKAGE PACK_DIR (started by FluxWorks' WorkerPool)")
    package, folder = argv[1], argv[2]
    key = bytes.fromhex(os.environ.pop("FLUXWORKS_WORKER_KEY"))
    register_package(package, folder)
    worker = importlib.import_module(f"{package}.flux_parallel.worker")
    with Listener(("127.0.0.1", 0), authkey=key) as listener:
        sys.stdout.write(f"{listener.address[1]}\n")
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        messages = listener.accept()
        cancels = listener.accept()
    worker.worker_main(messages, cancels)


if __name__ == "__main__":
    main(sys.argv)
