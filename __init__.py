"""FluxWorks: FLUX.1 nodes for ComfyUI. This file only registers nodes and the web extension folder.

Outside a ComfyUI process (e.g. when pytest imports this folder as a package) there is nothing to register.
"""

import importlib.util

WEB_DIRECTORY = "./js"

if importlib.util.find_spec("folder_paths") is not None:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
