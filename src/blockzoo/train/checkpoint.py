"""Checkpoints that survive interruption and corruption, and the final weights as safetensors.

A checkpoint is one ``torch.save`` file holding only tensors and plain Python values (dicts,
lists, numbers, strings), so it loads with ``torch.load(weights_only=True)``: no pickled code
runs on load, and a file that holds anything else is refused. The random number generator
states are stored in that form too (NumPy's state array as an ``int64`` tensor, Python's as a
list of integers).

Every checkpoint carries ``"checksum"``: a SHA-256 of its content (every key, value, tensor
dtype, shape and byte, see :func:`content_digest`), verified by :func:`load_checkpoint`. A
flipped bit or a truncated file is a :class:`CheckpointError` naming the file, never weights
that silently differ. The safetensors export carries the same digest of its tensors in its
metadata.

:func:`save_checkpoint` is atomic: it writes a temporary file ``.<name>.<pid>.tmp`` in the same
folder, flushes it to disk and renames it over the old checkpoint with ``os.replace`` (after
moving the old one to ``previous``, if asked), so a process killed at any moment leaves the
previous checkpoint or the new one, never a truncated file. A killed writer leaves its
temporary file behind; :func:`remove_stale_temporaries` clears them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..core.serialization import CheckpointError, first_line, safe_torch_load

CHECKSUM = "checksum"
_TEMPORARY = re.compile(r"^\..+\.(\d+)\.tmp$")


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


def content_digest(obj: Any) -> str:
    """SHA-256 (hex) of nested dicts/lists/tuples of tensors and plain values.

    Tensors contribute their dtype, shape and bytes; containers their structure and keys, so a
    changed value, key or shape changes the digest. It depends on the content only, not on how
    ``torch.save`` laid the file out.
    """
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k, v in x.items():
                feed(k)
                feed(v)
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                feed(v)
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # make a rename durable (POSIX)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_checkpoint(state: dict[str, Any], path: str | Path,
                    previous: str | Path | None = None) -> Path:
    """Write ``state`` plus its ``"checksum"`` to ``path`` atomically.

    With ``previous``, the checkpoint ``path`` held until now is kept there (the last two
    survive), moved only once the new one is fully on disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    state = {k: v for k, v in state.items() if k != CHECKSUM}
    state[CHECKSUM] = content_digest(state)
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.is_file():
            os.replace(path, previous)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` and verify its checksum.

    ``FileNotFoundError`` if absent; :class:`CheckpointError` (one line, naming the file) if it
    is refused, unreadable, has no checksum or does not match it.
    """
    path = Path(path)
    state = safe_torch_load(path, map_location)
    if not isinstance(state, dict) or CHECKSUM not in state:
        raise CheckpointError(f"{path} has no checksum: it was not written by blockzoo's "
                              f"save_checkpoint (or by an older version)")
    expected = state.pop(CHECKSUM)
    if content_digest(state) != expected:
        raise CheckpointError(f"{path} is corrupt: its content does not match its checksum")
    return state


def load_newest_good(paths: list[Path]) -> tuple[dict[str, Any], Path, list[str]]:
    """The first of ``paths`` (newest first) that loads and matches its checksum: ``(state,
    its path, the errors of the newer ones)``; :class:`CheckpointError` listing every error when
    none does, ``FileNotFoundError`` naming ``paths[0]`` when none exists."""
    errors = []
    for path in paths:
        if not path.is_file():
            continue
        try:
            return load_checkpoint(path), path, errors
        except CheckpointError as err:
            errors.append(str(err))
    if errors:
        raise CheckpointError("; ".join(errors) + " (no good checkpoint to resume from)")
    raise FileNotFoundError(f"no checkpoint at {paths[0]}")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``.<name>.<pid>.tmp`` files interrupted writes left in ``folder``.

    A file whose writer (``pid``) is still running is kept. Returns the files removed.
    """
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        match = _TEMPORARY.match(path.name)
        if not match or not path.is_file() or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes nothing yet at start: a reused pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def finite_state(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values()
               if t.is_floating_point())


def export_safetensors(model: nn.Module, path: str | Path,
                       metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s ``state_dict`` (parameters and buffers) as a safetensors file.

    Tensors are copied to CPU and made contiguous; ``metadata`` (strings) goes in the header
    with ``"checksum"``, the :func:`content_digest` of the tensors. Written atomically.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in
               model.state_dict().items()}
    metadata = {**(metadata or {}), CHECKSUM: content_digest(dict(sorted(tensors.items())))}
    tmp = _temporary(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a safetensors file; a ``"checksum"`` in the metadata is
    verified (:class:`CheckpointError` naming the file when it does not match or the file is
    unreadable)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt or truncated ({first_line(err)})") from None
    expected = metadata.get(CHECKSUM)
    if expected is not None and content_digest(dict(sorted(tensors.items()))) != expected:
        raise CheckpointError(f"{path} is corrupt: its tensors do not match its checksum")
    return tensors, metadata


def load_safetensors(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights written by :func:`export_safetensors` into ``model`` (strict, verified)."""
    model.load_state_dict(read_safetensors(path)[0])
    return model
