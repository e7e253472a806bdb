"""deepseek_mini: DeepSeek-V3, built one innovation at a time (arXiv 2412.19437).

The lecture notebooks in ``notebooks/`` build each component and export it here; this
package is what they leave behind, importable on its own::

    from deepseek_mini import load_config, build_model, count_parameters
    model = build_model(load_config("toy"), seed=0)
    print(count_parameters(model))

The public names are imported lazily (PEP 562) so that ``python -m deepseek_mini.export``
can always regenerate the notebook-exported modules, even when one of them is broken.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "ModelConfig": "deepseek_mini.config",
    "load_config": "deepseek_mini.config",
    "build_model": "deepseek_mini.model",
    "count_parameters": "deepseek_mini.model",
    "ParameterCount": "deepseek_mini.model",
    "Transformer": "deepseek_mini.model",
    "from_pretrained": "deepseek_mini.pretrained",
    "save_pretrained": "deepseek_mini.pretrained",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'deepseek_mini' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
