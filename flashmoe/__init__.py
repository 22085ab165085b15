"""flashmoe: Mixture-of-Experts models larger than RAM, on a patched llama.cpp."""
from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing flashmoe must not load llama.cpp (the build command runs before it exists).
    if name == "Engine":
        from flashmoe.engine import Engine

        return Engine
    raise AttributeError(name)
