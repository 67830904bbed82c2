"""Shared test set-up: fixed seeds, one thread per xdist worker, no network, markers.

Tests whose name says ``compile`` get the ``compile`` marker and those whose name says ``onnx``
or ``export`` the ``export`` marker, so that ``make test-fast`` (``-m "not compile and not
export and not slow"``) leaves out the slowest contract points without every test file having
to decorate them. ``slow`` is set explicitly.
"""

from __future__ import annotations

import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# Ultralytics, once imported, checks the network and pip-installs optional packages (a HEIF
# plugin when PIL meets a file it cannot identify); tests never touch the network.
os.environ.setdefault("YOLO_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        name = item.originalname if isinstance(item, pytest.Function) else item.name
        if "compile" in name:
            item.add_marker(pytest.mark.compile)
        if "onnx" in name or "export" in name:
            item.add_marker(pytest.mark.export)
