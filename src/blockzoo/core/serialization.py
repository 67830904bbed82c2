"""Reading ``torch.save`` files safely: tensors and plain values only, one-line errors.

Shared by checkpoints (``blockzoo.train``) and pretrained weights (``blockzoo.models``).
"""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used (corrupt, truncated, refused)."""


def safe_torch_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors (:class:`CheckpointError`).

    A file that needs pickled code (a class, a function) is refused with blockzoo's message; a
    file that is not a readable ``torch.save`` archive (empty, truncated, damaged) is called
    corrupt. Both name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):
            found = re.search(r"GLOBAL (\S+)", str(err))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path}: refused to load: it holds pickled Python objects{what}, not only "
                f"tensors and plain values, and loading those can run arbitrary code. Load "
                f"only files you trust; blockzoo's checkpoints never need this"
            ) from None
        raise CheckpointError(f"{path} is corrupt: {first_line(err)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError, OSError) as err:
        reason = ("empty file" if path.stat().st_size == 0 else
                  f"not a complete torch.save archive: {first_line(err) or type(err).__name__}")
        raise CheckpointError(f"{path} is corrupt or truncated ({reason})") from None


def first_line(err: BaseException) -> str:
    """The first sentence of an exception's message (at most 160 characters)."""
    text = str(err).strip().split("\n")[0]
    return text.split(". ")[0][:160]
