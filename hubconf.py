"""torch.hub entry points: every blockzoo network by name.

>>> model = torch.hub.load("path/to/blockzoo", "rednet50", source="local")
>>> model = torch.hub.load("path/to/blockzoo", "resnet50", source="local", pretrained=True)

Each entry point is ``blockzoo.create_model(name, pretrained=False, **kwargs)`` (``pretrained``:
``True`` for the authors' released checkpoint where it has a direct URL, or a local file).
A clone works without installing blockzoo: its ``src`` directory is put on ``sys.path``.
"""

import os
import sys

dependencies = ["torch", "torchvision", "safetensors"]

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(_SRC) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

from blockzoo.models import create_model, list_models  # noqa: E402


def _entrypoint(name):
    def entrypoint(pretrained=False, **kwargs):
        return create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = f"blockzoo.create_model({name!r}, pretrained=False, **kwargs)"
    return entrypoint


for _name in list_models():
    globals()[_name] = _entrypoint(_name)
