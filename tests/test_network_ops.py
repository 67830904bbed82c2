"""blockzoo's plain networks run exactly their twins' operators (no slower by construction).

The time and memory comparison itself is ``benchmarks/bench_models.py``; this test guards the
cause of parity: the same convolutions, norms, activations, adds and pools, with the same shapes
and the same in-place forms, and no extra copies, forward (eval, no autograd) and forward +
backward (train). Only the classifier head is written differently (``mean`` against
``adaptive_avg_pool2d`` + ``flatten``) and left out.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.profiler import profile

import blockzoo as bz

torchvision = pytest.importorskip("torchvision")

#: Operator name fragments compared: the layers' work, in-place forms and copies.
COMPARED = ("conv", "batch_norm", "relu", "clamp", "hardtanh", "add", "max_pool", "copy_",
            "clone", "contiguous", "threshold_backward", "empty")


def _operators(model: torch.nn.Module, x: torch.Tensor, train: bool) -> collections.Counter:
    model.train(train)
    with profile(record_shapes=True) as prof:
        if train:
            model(x).sum().backward()
        else:
            with torch.no_grad():
                model(x)
    return collections.Counter(
        (event.name, str(event.input_shapes))
        for event in prof.events()
        if any(part in event.name for part in COMPARED) and "[1000" not in str(event.input_shapes)
    )


@pytest.mark.parametrize("train", [False, True], ids=["eval-forward", "train-forward-backward"])
@pytest.mark.parametrize(("name", "twin"), [("resnet50", "resnet50"),
                                            ("mobilenetv2", "mobilenet_v2")])
def test_plain_networks_run_torchvisions_operators(name: str, twin: str, train: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    mine = _operators(bz.create_model(name), x, train)
    theirs = _operators(getattr(torchvision.models, twin)(), x, train)
    assert sum(mine.values()) > 100
    assert mine == theirs, {k: (mine[k], theirs[k]) for k in set(mine) | set(theirs)
                            if mine[k] != theirs[k]}


@pytest.mark.parametrize("train", [False, True], ids=["eval-forward", "train-forward-backward"])
def test_se_resnet50_runs_timms_seresnet50_operators(train: bool) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    mine = _operators(bz.create_model("se_resnet50"), x, train)
    theirs = _operators(timm.create_model("seresnet50"), x, train)
    assert mine == theirs, {k: (mine[k], theirs[k]) for k in set(mine) | set(theirs)
                            if mine[k] != theirs[k]}
