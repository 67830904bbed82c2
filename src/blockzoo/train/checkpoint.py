"""Checkpoints that survive interruption, and the final weights as safetensors.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values (dicts,
lists, numbers, strings), so it loads with ``torch.load(weights_only=True)``: no pickled code
runs on load. The random number generator states are stored in that form too (NumPy's state
array as an ``int64`` tensor, Python's as a list of integers).

:func:`save_checkpoint` is atomic: it writes a temporary file in the same folder, flushes it to
disk and renames it over the old checkpoint with ``os.replace``, so a process killed at any
moment leaves either the previous checkpoint or the new one, never a truncated file.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn


def rng_state() -> dict[str, Any]:
    """The states of torch's CPU (and every CUDA) generator, NumPy's and Python's global RNGs."""
    bit_generator, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"bit_generator": bit_generator, "keys": torch.from_numpy(keys.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generator states :func:`rng_state` returned.

    CUDA states are restored only when as many devices are visible as were saved.
    """
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def export_safetensors(model: nn.Module, path: str | Path,
                       metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s ``state_dict`` (parameters and buffers) as a safetensors file.

    Tensors are copied to CPU and made contiguous; ``metadata`` (strings) goes in the header.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in
               model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_safetensors(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights written by :func:`export_safetensors` into ``model`` (strict)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model
