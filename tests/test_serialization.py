"""Files read with torch.load: pickled code is refused with blockzoo's own one-line message."""

from __future__ import annotations

import os

import pytest
import torch

import blockzoo as bz
from blockzoo.core.serialization import CheckpointError, safe_torch_load


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pretrained_file_with_pickled_code_is_refused_without_torch_hints(tmp_path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "payload": _RunsCode()}, path)
    with pytest.raises(CheckpointError, match="refused to load") as caught:
        bz.create_model("resnet50", pretrained=str(path))
    message = str(caught.value)
    assert str(path) in message and "\n" not in message
    assert "weights_only=False" not in message


def test_truncated_and_empty_files_are_called_corrupt(tmp_path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(1000.0)}, good)
    assert torch.equal(safe_torch_load(good)["w"], torch.arange(1000.0))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:200])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path, reason in ((cut, "corrupt or truncated"), (empty, "empty file")):
        with pytest.raises(CheckpointError, match=reason):
            safe_torch_load(path)
