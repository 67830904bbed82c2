"""The block contract, run over every registered block (see README, "The block contract").

A block registered with ``blockzoo.register_block`` is tested here without further work: the
configurations come from its registry entry (``tests/contract.py``).
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from torch.export import Dim

import blockzoo as bz

from .contract import (
    BF16_RELATIVE_TOLERANCE,
    EXAMPLES,
    Config,
    all_configs,
    configs,
    deterministic_algorithms,
    example,
    main_config,
)

NAMES = bz.list_blocks()
CONFIGS = all_configs()
SIZES = [(1, 1), (2, 2), (5, 7), (8, 8), (3, 10)]


def _run(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return block(x)


def test_every_kind_has_blocks_and_every_block_has_configs() -> None:
    assert NAMES, "no block registered"
    for kind in bz.KINDS:
        assert bz.list_blocks(kind), f"no block of kind {kind!r} is registered"
    for name in NAMES:
        assert configs(name), name


def test_contract_examples_name_registered_blocks() -> None:
    unknown = set(EXAMPLES) - set(NAMES)
    assert not unknown, f"tests/contract.py EXAMPLES names unregistered blocks: {unknown}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_output_size_rule_train_batch_one_and_any_size(cfg: Config) -> None:
    block = cfg.build().train()
    assert block.in_channels == cfg.in_channels
    assert block.stride == cfg.stride
    if cfg.out_channels is not None:
        assert block.out_channels == cfg.out_channels
    elif bz.block_info(cfg.name).width != "structural":
        assert block.out_channels == cfg.in_channels
    for h, w in SIZES:
        y = block(cfg.input(1, h, w))
        assert y.shape == cfg.expected_shape(block, 1, h, w), (h, w)
        assert torch.isfinite(y).all(), (h, w)
    block.eval()
    y = _run(block, cfg.input(3, 9, 6))
    assert y.shape == cfg.expected_shape(block, 3, 9, 6)


@pytest.mark.parametrize("name", NAMES)
def test_rejects_bad_arguments_with_a_named_value_error(name: str) -> None:
    info = bz.block_info(name)
    cfg = main_config(name)
    cls_name = info.cls.__name__
    for stride in {1, 2, 3} - set(info.strides):
        with pytest.raises(ValueError, match=cls_name):
            bz.create_block(name, cfg.in_channels, stride=stride, **cfg.kwargs)
    if info.width != "free":
        with pytest.raises(ValueError, match=cls_name):
            bz.create_block(name, cfg.in_channels, cfg.in_channels * 5 + 3, **cfg.kwargs)
    if info.kind == "attention":
        assert info.width == "same" and info.strides == (1,)
    for bad in (0, -4, 2.5):
        with pytest.raises(ValueError, match=cls_name):
            bz.create_block(name, bad, **cfg.kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_rejects_bad_inputs_naming_block_and_shapes(name: str) -> None:
    cfg = main_config(name)
    block = cfg.build()
    cls_name = type(block).__name__
    c = cfg.in_channels
    bad_inputs = [
        torch.randn(c, 8, 8),
        torch.randn(2, c + 1, 8, 8),
        torch.randn(1, 2, c, 8, 8),
    ]
    for x in bad_inputs:
        with pytest.raises(ValueError) as err:
            block(x)
        message = str(err.value)
        assert cls_name in message
        assert str(tuple(x.shape)) in message
        assert str(c) in message
    with pytest.raises(ValueError, match=f"{cls_name}.*dtype"):
        block(torch.ones(2, c, 8, 8, dtype=torch.int64))


@pytest.mark.parametrize("name", NAMES)
def test_backward_reaches_every_parameter(name: str) -> None:
    cfg = main_config(name)
    block = cfg.build().train()
    x = cfg.input(2, 7, 6).requires_grad_()
    block(x).square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for pname, p in block.named_parameters():
        assert p.grad is not None, f"{name}: parameter {pname} received no gradient"
        assert torch.isfinite(p.grad).all(), pname


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name: str) -> None:
    cfg = main_config(name)
    block = cfg.build(dtype=torch.float64).train()
    x = cfg.input(2, 5, 4, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(block, (x,), fast_mode=True, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_device_and_dtype_arguments(name: str) -> None:
    cfg = main_config(name)
    block = cfg.build(device="cpu", dtype=torch.float64)
    tensors = list(block.parameters()) + [b for b in block.buffers() if b.is_floating_point()]
    assert bool(tensors) != example(name).parameter_free, "declare parameter-free blocks"
    assert all(t.dtype == torch.float64 for t in tensors)
    y = _run(block.eval(), cfg.input(1, 6, 5, dtype=torch.float64))
    assert y.dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_and_pickle(name: str) -> None:
    cfg = main_config(name)
    block = cfg.build().train()
    block(cfg.input(2, 6, 6))  # moves running statistics away from their initial values
    block.eval()
    x = cfg.input(2, 7, 5)
    expected = _run(block, x)
    torch.manual_seed(123)
    fresh = cfg.build().eval()
    fresh.load_state_dict(block.state_dict())
    torch.testing.assert_close(_run(fresh, x), expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(block.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(_run(fresh, x), expected, rtol=0, atol=0)
    clone = pickle.loads(pickle.dumps(block))
    torch.testing.assert_close(_run(clone, x), expected, rtol=0, atol=0)
    torch.testing.assert_close(_run(copy.deepcopy(block), x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_close_to_float32(name: str) -> None:
    cfg = main_config(name)
    block = cfg.build().eval()
    x = cfg.input(2, 9, 7)
    expected = _run(block, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _run(block, x)
    assert y.shape == expected.shape
    error = (y.float() - expected).norm() / expected.norm().clamp_min(1e-12)
    assert error < BF16_RELATIVE_TOLERANCE, float(error)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_block_close_to_float32(name: str, dtype: torch.dtype) -> None:
    """``block.to(dtype)`` on a ``dtype`` input trains (forward and backward) and stays close to
    the float32 block holding the same values."""
    cfg = main_config(name)
    block = cfg.build().train()
    half = copy.deepcopy(block).to(dtype)
    block.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    x = cfg.input(2, 9, 7).to(dtype).requires_grad_()
    y = half(x)
    assert y.dtype == dtype
    y.float().square().mean().backward()
    assert x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    for pname, p in half.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname}"
    expected = block(x.detach().float())
    error = (y.detach().float() - expected).norm() / expected.norm().clamp_min(1e-12)
    tolerance = 1e-2 if dtype == torch.float16 else BF16_RELATIVE_TOLERANCE
    assert error < tolerance, float(error)


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_and_non_contiguous_inputs(name: str) -> None:
    cfg = main_config(name)
    block = cfg.build().eval()
    x = cfg.input(2, 9, 7)
    expected = _run(block, x)
    # a planar (NCHW-contiguous) input gives a planar output, on which .view() works
    assert expected.is_contiguous(), f"{name}: output strides {expected.stride()}"
    torch.testing.assert_close(
        _run(block, x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5
    )
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not transposed.is_contiguous()
    torch.testing.assert_close(_run(block, transposed), expected, rtol=1e-4, atol=1e-5)
    strided = cfg.input(2, 9, 14)[..., ::2]
    torch.testing.assert_close(
        _run(block, strided), _run(block, strided.contiguous()), rtol=1e-4, atol=1e-5
    )
    block_cl = copy.deepcopy(block).to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        _run(block_cl, x.to(memory_format=torch.channels_last)), expected, rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_algorithms(name: str) -> None:
    cfg = main_config(name)
    with deterministic_algorithms():
        outputs = []
        for _ in range(2):
            torch.manual_seed(7)
            block = cfg.build().train()
            x = cfg.input(2, 7, 6).requires_grad_()
            y = block(x)
            y.square().mean().backward()
            outputs.append((y.detach(), x.grad))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_fullgraph_matches_eager(name: str) -> None:
    info = bz.block_info(name)
    cfg = main_config(name)
    block = cfg.build().eval()
    x = cfg.input(2, 9, 7)
    expected = _run(block, x)
    torch._dynamo.reset()
    if not info.fullgraph:
        assert info.notes, f"{name} is marked not fullgraph without a reason in its notes"
        with pytest.raises(Exception):  # noqa: B017 - the graph break itself is the proof
            _run(torch.compile(block, fullgraph=True), x)
        torch._dynamo.reset()
        compiled = torch.compile(block)
    else:
        compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(_run(compiled, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_dynamic_batch_and_size(name: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    cfg = main_config(name)
    block = cfg.build(**example(name).export_kwargs).eval()
    path = tmp_path / f"{name}.onnx"
    dims = {0: Dim("batch", min=1), 2: Dim("height", min=1), 3: Dim("width", min=1)}
    torch.onnx.export(
        block,
        (cfg.input(2, 9, 7),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        opset_version=18,
        dynamic_shapes={"x": dims},
    )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, h, w in [(3, 12, 5), (1, 7, 10)]:
        x = cfg.input(n, h, w)
        (y,) = session.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(y, _run(block, x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_zero_batch_gives_an_empty_output(name: str) -> None:
    """A batch of 0 samples (detection heads and samplers make them) runs in training and eval
    mode, forward and backward, as ``nn.Conv2d`` does."""
    cfg = main_config(name)
    block = cfg.build().train()
    x = cfg.input(0, 9, 7).requires_grad_()
    y = block(x)
    assert y.shape == cfg.expected_shape(block, 0, 9, 7)
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert _run(block.eval(), cfg.input(0, 5, 6)).shape == cfg.expected_shape(block, 0, 5, 6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_foreign_dtype_input_is_a_value_error_naming_both_dtypes(
    name: str, dtype: torch.dtype
) -> None:
    """A float32 block refuses another floating dtype outside autocast; under bfloat16 autocast
    it takes bfloat16 (the autocast dtype) and refuses the others. A parameter-free block has
    no dtype of its own: it computes in its input's."""
    cfg = main_config(name)
    block = cfg.build().eval()
    x = cfg.input(2, 6, 5).to(dtype)
    if example(name).parameter_free:
        assert _run(block, x).dtype == dtype
        return
    with pytest.raises(ValueError) as err:
        block(x)
    message = str(err.value)
    assert type(block).__name__ in message
    assert str(dtype) in message and str(torch.float32) in message
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if dtype != torch.bfloat16:
            with pytest.raises(ValueError, match=str(dtype)):
                block(x)
        else:
            assert _run(block, x).shape == cfg.expected_shape(block, 2, 6, 5)


@pytest.mark.parametrize("name", NAMES)
def test_jit_trace_generalises_to_other_batch_sizes(name: str) -> None:
    """Traced at batch 2, the block gives the eager result at batch 3 and 1: no batch size is
    baked into the graph."""
    cfg = main_config(name)
    block = cfg.build().eval()
    with torch.no_grad():
        traced = torch.jit.trace(block, cfg.input(2, 9, 7), check_trace=False)
    for n in (3, 1):
        x = cfg.input(n, 9, 7)
        torch.testing.assert_close(_run(traced, x), _run(block, x), rtol=1e-4, atol=1e-5)
