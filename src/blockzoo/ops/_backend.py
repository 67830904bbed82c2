"""Which implementation runs: blockzoo's compiled CPU kernels or the PyTorch reference forms.

The kernels are written for numba (``pip install blockzoo[fast]``), which compiles them with its
own LLVM on first use (cached next to the sources), so no C compiler is needed. Without numba,
with ``BLOCKZOO_DISABLE_FAST_OPS=1`` in the environment, inside :func:`fast_ops` ``(False)``, on
non-CPU devices, for dtypes other than float32/float64, while exporting to ONNX or tracing with
``torch.jit.trace``, the blocks run their PyTorch reference forms instead (same results).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:
    import numba
except ImportError:  # the optional extra is not installed: reference forms only
    numba = None

ENV_DISABLE = "BLOCKZOO_DISABLE_FAST_OPS"
FAST_DTYPES = (torch.float32, torch.float64)

_state = {"enabled": numba is not None and os.environ.get(ENV_DISABLE, "") in ("", "0")}


def _after_fork_in_child() -> None:
    """A forked child of a process whose kernels ran on GNU OpenMP threads would be terminated
    by the OpenMP runtime on its first parallel region: the child runs the reference forms."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no kernel has run yet: the child may start its own threads
        return
    if layer == "omp":
        _state["enabled"] = False


if numba is not None and hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def fast_ops_available() -> bool:
    """Whether the compiled kernels can run at all (numba is installed)."""
    return numba is not None


def fast_ops_enabled() -> bool:
    """Whether the compiled kernels are available and not switched off."""
    return numba is not None and _state["enabled"]


@contextlib.contextmanager
def fast_ops(enabled: bool) -> Iterator[None]:
    """Switch the compiled kernels on or off inside a ``with`` block (no effect without numba).

    ``with blockzoo.ops.fast_ops(False): ...`` runs the PyTorch reference forms, as does the
    environment variable ``BLOCKZOO_DISABLE_FAST_OPS=1`` for a whole process.
    """
    previous = _state["enabled"]
    _state["enabled"] = bool(enabled) and numba is not None
    try:
        yield
    finally:
        _state["enabled"] = previous


def use_fast_path(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` takes the compiled kernels (see the module docstring)."""
    if not _state["enabled"] or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return False
    dtype = tensors[0].dtype
    return all(
        t.device.type == "cpu" and t.dtype == dtype and dtype in FAST_DTYPES for t in tensors
    )


def path_description() -> str:
    """One line for ``blockzoo info``: which implementation CPU float32/float64 calls take."""
    if numba is None:
        return "PyTorch reference form (install blockzoo[fast] for the compiled CPU kernels)"
    if not _state["enabled"]:
        return f"PyTorch reference form (compiled kernels switched off, {ENV_DISABLE})"
    return (
        f"compiled CPU kernels (numba {numba.__version__}) for float32/float64 on CPU; "
        "PyTorch reference form elsewhere"
    )


def kernel(
    parallel: bool = True, reassociate: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: compile with numba (cached, parallel), or leave the function as it is.

    ``reassociate=True`` lets the compiler reorder floating-point sums (so that a reduction loop
    is vectorised); the order is fixed at compile time, so results stay deterministic.
    """
    if numba is None:
        return lambda fn: fn
    fastmath = {"contract", "reassoc"} if reassociate else {"contract"}
    return numba.njit(
        parallel=parallel, cache=True, fastmath=fastmath, error_model="numpy", nogil=True
    )


prange = range if numba is None else numba.prange


def _start_thread_pool() -> None:
    """Start numba's thread pool with idle workers that sleep instead of spinning.

    With pip wheels numba's OpenMP layer loads its own GNU OpenMP runtime beside torch's, whose
    idle workers spin for milliseconds after every parallel region (the default wait policy):
    on a machine with as many cores as threads they took a core from torch's next operator.
    That runtime reads ``OMP_WAIT_POLICY`` once, when numba loads it (here, on the first kernel
    call), so it is set to ``passive`` for that moment only, unless the user set it; torch's
    runtime, loaded long before, keeps its own settings.
    """
    if "OMP_WAIT_POLICY" in os.environ:  # the user's policy: the first call loads the layer
        return
    os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        numba.set_num_threads(1)  # loads the threading layer
    finally:
        del os.environ["OMP_WAIT_POLICY"]


@contextlib.contextmanager
def kernel_threads(chunk: int = 0) -> Iterator[None]:
    """Run the kernels inside on as many threads as torch uses (``torch.set_num_threads``).

    Numba's OpenMP layer sets the process-wide OpenMP thread count when it starts its pool,
    which torch shares: torch's count is put back at once (for torch's own operations inside)
    and afterwards. ``chunk > 0`` hands the iterations of parallel loops out ``chunk`` at a time
    to whichever thread is free (dynamic scheduling: a thread that the OS holds back on a busy
    machine does not hold up the others).
    """
    count = torch.get_num_threads()
    if not _state.get("pool_started"):
        _start_thread_pool()
        _state["pool_started"] = True
    numba.set_num_threads(max(1, min(count, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    previous_chunk = numba.set_parallel_chunksize(chunk)
    try:
        yield
    finally:
        numba.set_parallel_chunksize(previous_chunk)
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)


def as_array(t: torch.Tensor) -> Any:
    """A contiguous tensor's memory as a numpy array (no copy)."""
    return t.detach().numpy()
