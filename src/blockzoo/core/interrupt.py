"""Stopping on SIGINT/SIGTERM without a traceback.

Two ways to react to a signal:

- :func:`signals_raise` (the ``blockzoo`` command around every sub-command): SIGINT already
  raises ``KeyboardInterrupt``; this makes SIGTERM raise :class:`Interrupted` too, so the command
  can print one line and exit ``128 + signal``.
- :class:`StopRequest` (the training loop): the first SIGINT or SIGTERM only records the request,
  and the loop stops at its next step boundary after writing a checkpoint; a second signal stops
  at once (:class:`Interrupted`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """A stop asked for by signal ``signum`` (a ``BaseException``, like ``KeyboardInterrupt``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal_name(signum)}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's code for death by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    """``"SIGINT"`` for ``signal.SIGINT``, and so on."""
    return signal.Signals(signum).name


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def _handlers(handler: object) -> Iterator[None]:
    """Install ``handler`` for SIGINT and SIGTERM (main thread only), restoring them after."""
    if not _in_main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def signals_raise() -> contextlib.AbstractContextManager[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` while the context is active."""
    return _handlers(_raise)


class StopRequest:
    """Records the first SIGINT/SIGTERM while active (``signum``); a second one raises.

    >>> with StopRequest() as stop:  # doctest: +SKIP
    ...     for step in steps:
    ...         work(step)
    ...         if stop.signum is not None:
    ...             save_and_leave()
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._context: contextlib.AbstractContextManager[None] | None = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def __enter__(self) -> StopRequest:
        self._context = _handlers(self._handler)
        self._context.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._context is not None
        self._context.__exit__(*exc)


def ignore_sigint(worker_id: int = 0) -> None:
    """A ``DataLoader`` ``worker_init_fn``: Ctrl-C reaches the terminal's whole process group,
    and the main process (not the loader workers) decides when to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
