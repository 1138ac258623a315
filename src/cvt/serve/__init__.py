"""`cvt serve`: a model as an HTTP service on Ray Serve (the "serve" extra).

The deployment is `cvt.serve.deployment`; its names are also `cvt.serve`'s, loaded on first use
(PEP 562), so Ray Serve's import path `cvt.serve:NAME` names them while `cvt.serve.http_limits`,
which every HTTP proxy imports, loads no torch and no model code.
"""

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(f"module 'cvt.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(".deployment", __name__), name)
