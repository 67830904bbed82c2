"""Dynamic and conditionally parameterised convolutions: per-sample mixtures of expert kernels.

- Dynamic Convolution: Attention over Convolution Kernels, Chen et al., CVPR 2020,
  arXiv 1912.03458
- CondConv: Conditionally Parameterized Convolutions for Efficient Inference, Yang et al.,
  NeurIPS 2019, arXiv 1904.04971

Both layers hold ``K`` expert kernels ``W_k`` (and biases ``b_k``) and compute, for sample ``n``
with routing weights ``r_n`` (``(N, K)``),

    ``y_n = conv(x_n, sum_k r_nk W_k) + sum_k r_nk b_k``.

They differ in the routing: DY-Conv uses a softmax attention with a temperature, CondConv a
sigmoid per expert. Two execution strategies compute the same thing (a convolution is linear in
its weight):

- ``"aggregate"``: one matmul builds the per-sample kernels ``(N, C_out, C_in/g, k, k)``, then ONE
  grouped convolution with ``groups = N * g`` runs over the input reshaped to
  ``(1, N * C_in, H, W)``. A routing shared by the whole batch (``(1, K)``, and so every batch of
  one) is a single ordinary convolution with the aggregated kernel.
- ``"mix"``: the ``K`` expert convolutions run as one convolution with ``K * C_out`` output
  channels, and their outputs are mixed per sample with one batched matmul. It costs ``K`` times
  the convolution's arithmetic and ``K`` times its output memory, but uses the ordinary batched
  convolution kernels.
- ``"auto"`` (default) picks ``"mix"`` only where it measured faster on CPU: batch
  ``N >= 16``, output map of at most ``8 x 8`` positions, ``k > 1``, ``groups == 1`` and
  ``K <= 4``, where the grouped convolution with ``N`` groups is slow. The rule lives in
  :meth:`ExpertConv2d.choose_strategy`; the measurements behind it are in docs/benchmarks.md
  ("The strategy="auto" rule", re-measured by ``benchmarks/bench_dynamic_conv.py --strategies``).

While exporting (``torch.export``, and so the ONNX exporter) or tracing (``torch.jit.trace``) the
``"mix"`` strategy is always used: ONNX ``Conv``'s ``group`` attribute and a traced graph's
constants cannot follow the batch size, so a grouped convolution whose group count is the batch
size would not generalise to other batch sizes. An empty batch uses ``"mix"`` too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..core.counting import map_elements
from ..core.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_non_negative_int,
    check_positive_int,
    check_positive_number,
)
from ..layers import LayerSpec, create_act, create_norm, same_padding
from ..registry import register_block
from .base import Block, ExplainKey

Strategy = Literal["auto", "aggregate", "mix"]


@dataclass(frozen=True)
class TemperatureAnnealing:
    """A linear softmax-temperature annealing: ``start`` -> ``end`` over ``epochs`` epochs."""

    start: float
    end: float
    epochs: int

    def as_dict(self) -> dict[str, Any]:
        """``{"start": ..., "end": ..., "epochs": ...}``: :class:`TemperatureSchedule`'s kwargs."""
        return asdict(self)


#: DY-Conv's temperature annealing (Chen et al., arXiv 1912.03458, training section): 30 -> 1,
#: linear, over the first 10 epochs. The one home of these numbers: the blocks' default
#: temperature, :class:`TemperatureSchedule`, the models' ``default_cfg["temperature_schedule"]``
#: and ``blockzoo train`` all read it.
DY_CONV_TEMPERATURE = TemperatureAnnealing(start=30.0, end=1.0, epochs=10)
STRATEGIES: tuple[str, ...] = ("auto", "aggregate", "mix")
#: DY-Conv's attention width: the paper's ``max(C / reduction, K)`` or the reference code's
#: ``int(C / reduction) + 1``.
AttentionWidth = Literal["paper", "reference"]
ATTENTION_WIDTHS: tuple[str, ...] = ("paper", "reference")

#: ``strategy="auto"`` uses ``"mix"`` for batches of at least this many samples ...
MIX_MIN_BATCH = 16
#: ... whose output maps have at most this many positions ...
MIX_MAX_AREA = 64
#: ... with at most this many experts (a kernel larger than 1x1 and ``groups == 1``).
MIX_MAX_EXPERTS = 4


def _exporting() -> bool:
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def tf_same_pad(x: torch.Tensor, kernel_size: int, stride: int, dilation: int) -> torch.Tensor:
    """``x`` zero-padded as TensorFlow's ``'SAME'`` convolution pads it.

    Per spatial size ``n``: ``total = max((ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)``,
    ``total // 2`` before and the rest after (asymmetric when ``total`` is odd, e.g. 0 before and
    1 after for ``k = 3``, ``s = 2`` and an even ``n``). A convolution without padding then gives
    ``ceil(n / s)``.
    """
    def amounts(n: int) -> tuple[int, int]:
        total = max((-(-n // stride) - 1) * stride + dilation * (kernel_size - 1) + 1 - n, 0)
        return total // 2, total - total // 2

    top, bottom = amounts(x.shape[2])
    left, right = amounts(x.shape[3])
    if top == bottom == left == right == 0:
        return x
    return F.pad(x, (left, right, top, bottom))


class ExpertConv2d(Block):
    """Base of :class:`DynamicConv2d` and :class:`CondConv2d`: expert kernels and the strategies.

    ``weight`` is ``(K * C_out, C_in / groups, k, k)``, the ``K`` expert conv weights stacked
    expert after expert (:meth:`expert_weights` views it as ``(K, C_out, C_in / groups, k, k)``;
    a 4-D parameter keeps ``module.to(memory_format=torch.channels_last)`` working), and ``bias``
    is ``(K, C_out)`` or ``None``. Every expert is initialised independently as
    ``nn.Conv2d`` initialises its weight (``kaiming_uniform_(a=sqrt(5))``); biases start at zero.
    ``padding="same"`` is ``dilation * (k - 1) // 2`` (odd ``k`` only), which gives an output of
    ``ceil(H / stride)`` for every stride (unlike ``nn.Conv2d``'s ``"same"``, which allows stride
    1 only); ``padding="tf_same"`` is TensorFlow's ``'SAME'`` (:func:`tf_same_pad`: the same
    output size, but the padding is computed from the input size and its odd pixel goes after,
    so at stride 2 on an even size it is 0 before and 1 after), which TF-trained weights need;
    an integer padding is used as given. ``stride`` is 1 or 2.
    """

    allowed_strides = (1, 2)

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None,
        stride: int,
        *,
        num_experts: int,
        kernel_size: int,
        padding: int | str,
        dilation: int,
        groups: int,
        bias: bool,
        strategy: Strategy,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        name = type(self).__name__
        self.kernel_size = check_positive_int(name, "kernel_size", kernel_size)
        self.dilation = check_positive_int(name, "dilation", dilation)
        self.groups = check_positive_int(name, "groups", groups)
        self.num_experts = check_positive_int(name, "num_experts", num_experts)
        check_bool(name, "bias", bias)
        self.strategy = check_choice(name, "strategy", strategy, STRATEGIES)
        self.require(
            in_channels % groups == 0 and self.out_channels % groups == 0,
            f"groups ({groups}) must divide in_channels ({in_channels}) and out_channels "
            f"({self.out_channels})",
        )
        self.tf_same = padding == "tf_same"
        if self.tf_same:
            padding = 0
        if padding == "same":
            self.require(
                kernel_size % 2 == 1,
                f"padding='same' needs an odd kernel_size, got {kernel_size}",
            )
            padding = same_padding(kernel_size, dilation)
        self.require(
            isinstance(padding, int) and not isinstance(padding, bool) and padding >= 0,
            f"padding must be 'same', 'tf_same' or a non-negative integer, got {padding!r}",
        )
        self.padding = padding
        self.weight = nn.Parameter(
            torch.empty(num_experts * self.out_channels, in_channels // groups, kernel_size,
                        kernel_size)
        )
        self.bias = nn.Parameter(torch.empty(num_experts, self.out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every expert as ``nn.Conv2d`` would, independently; zero biases."""
        for expert in self.weight.detach().split(self.out_channels):
            nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def expert_weights(self) -> torch.Tensor:
        """The expert kernels as ``(K, C_out, C_in / groups, k, k)``."""
        return self.weight.reshape(self.num_experts, self.out_channels, *self.weight.shape[1:])

    @torch.no_grad()
    def load_conv_experts(self, conv: nn.Conv2d, scale: float) -> None:
        """Every expert := ``scale * W``, every expert bias ``scale * b`` (``conv``'s ``W, b``)."""
        self.require_conv_kernel(conv, self.expert_weights().shape[1:])
        self.weight.copy_((conv.weight * scale).repeat(self.num_experts, 1, 1, 1))
        if self.bias is not None:
            bias = torch.zeros_like(self.bias[0]) if conv.bias is None else conv.bias * scale
            self.bias.copy_(bias.expand(self.num_experts, -1))

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """The convolution's output size for an ``h x w`` input."""
        if self.tf_same:
            return -(-h // self.stride), -(-w // self.stride)
        span = self.dilation * (self.kernel_size - 1) + 1
        return (
            (h + 2 * self.padding - span) // self.stride + 1,
            (w + 2 * self.padding - span) // self.stride + 1,
        )

    def choose_strategy(self, x: torch.Tensor) -> str:
        """``"aggregate"`` or ``"mix"`` for input ``x`` (see the module docstring for the rule).

        ``"mix"`` while exporting or tracing (``torch.jit.trace``), where a group count taken
        from the batch size would be baked into the graph, and for an empty batch (no
        convolution has zero groups).
        """
        if _exporting() or torch.jit.is_tracing() or x.shape[0] == 0:
            return "mix"
        if self.strategy != "auto":
            return self.strategy
        oh, ow = self.output_size(x.shape[2], x.shape[3])
        mix = (
            x.shape[0] >= MIX_MIN_BATCH
            and oh * ow <= MIX_MAX_AREA
            and self.kernel_size > 1
            and self.groups == 1
            and self.num_experts <= MIX_MAX_EXPERTS
        )
        return "mix" if mix else "aggregate"

    def aggregate_kernels(
        self, routing: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kernels ``(R, C_out, C_in/g, k, k)`` and biases ``(R, C_out)`` for routing ``(R, K)``.

        ``W_r = sum_k routing[r, k] W_k``, one matmul for the kernels and one for the biases.
        """
        kernels = torch.matmul(routing, self.weight.reshape(self.num_experts, -1))
        kernels = kernels.reshape(routing.shape[0], self.out_channels, *self.weight.shape[1:])
        biases = None if self.bias is None else torch.matmul(routing, self.bias)
        return kernels, biases

    def _conv(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _aggregate(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        kernels, biases = self.aggregate_kernels(routing)
        if routing.shape[0] == 1:  # one kernel for the whole batch: an ordinary convolution
            return self._conv(x, kernels[0], None if biases is None else biases[0], self.groups)
        n, c, h, w = x.shape
        y = self._conv(
            x.reshape(1, n * c, h, w),
            kernels.reshape(n * self.out_channels, *kernels.shape[2:]),
            None if biases is None else biases.reshape(-1),
            n * self.groups,
        )
        return y.reshape(n, self.out_channels, y.shape[2], y.shape[3])

    def _mix(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        k, g, c_out = self.num_experts, self.groups, self.out_channels
        # A grouped conv's output channels are group-major: put the experts inside each group.
        weight = self.weight.reshape(k, g, c_out // g, *self.weight.shape[1:]).transpose(0, 1)
        weight = weight.reshape(self.weight.shape)
        bias = None
        if self.bias is not None:
            bias = self.bias.reshape(k, g, c_out // g).transpose(0, 1).reshape(-1)
        y = self._conv(x, weight, bias, g)  # (N, g * K * C_out/g, H', W')
        n, _, oh, ow = y.shape
        y = torch.matmul(routing.reshape(-1, 1, 1, k), y.reshape(n, g, k, c_out // g * oh * ow))
        return y.reshape(n, c_out, oh, ow)

    def extra_flops(self, x: torch.Tensor) -> int:
        """The routing's global average pool, one multiply-add per input value: ``2 * N*C*H*W``
        FLOPs. The kernel aggregation (or the expert mixing) is a matmul and the convolution
        a conv, both counted by FlopCounterMode."""
        return 2 * map_elements(x)

    def mixture_conv(self, x: torch.Tensor, routing: torch.Tensor) -> torch.Tensor:
        """``conv(x_n, sum_k r_nk W_k) + sum_k r_nk b_k`` for routing ``(N, K)`` or ``(1, K)``.

        A ``(1, K)`` routing is shared by every sample.
        """
        if self.tf_same:
            x = tf_same_pad(x, self.kernel_size, self.stride, self.dilation)
        if self.choose_strategy(x) == "mix":
            return self._mix(x, routing)
        return self._aggregate(x, routing)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights ``(N, K)`` for input ``x`` (each subclass's own rule)."""
        raise NotImplementedError

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Routing weights ``(N, K)`` and aggregated kernels ``(N, C_out, C_in/g, k, k)``."""
        self.check_input(x)
        routing = self.routing(x)
        return {
            ExplainKey.ROUTING_WEIGHTS: routing,
            ExplainKey.KERNELS: self.aggregate_kernels(routing)[0],
        }

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel_size={self.kernel_size}, "
            f"padding={'tf_same' if self.tf_same else self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"num_experts={self.num_experts}, strategy={self.strategy!r}"
        )


_CONV = dict(kind="conv")


@register_block(
    "dynamic_conv",
    paper="Dynamic Convolution: Attention over Convolution Kernels",
    arxiv="1912.03458",
    year=2020,
    summary="Convolves each sample with a softmax-attention mixture of K kernels (DY-Conv).",
    notes="exports with the 'mix' strategy (ONNX Conv groups cannot follow a dynamic batch).",
    **_CONV,
)
class DynamicConv2d(ExpertConv2d):
    """Dynamic convolution, DY-Conv (Chen et al., arXiv 1912.03458).

    Attention over ``K`` kernels (default 4): ``pi(x) = softmax(FC2(relu(FC1(mean_hw(x)))) / T)``
    with ``FC1: C_in -> max(C_in / reduction, K)`` (``reduction = 4``), ``FC2: -> K`` (both with
    bias). As in the paper's figure and text (pool, FC, ReLU, FC, softmax) the attention branch
    has no BatchNorm, so it is defined for a batch of one.

    The widely used PyTorch reference code (``Dynamic-convolution-Pytorch``, its
    ``attention2d``) differs: ``FC1`` has no bias and width ``int(C_in * 0.25) + 1`` (``K`` for
    a 3-channel input). ``attention_bias=False, attention_width="reference"`` reproduce it
    (with ``reduction = 4``: ``int(C_in / reduction) + 1``), so its checkpoints' attention
    tensors have the shapes they need; the defaults stay the paper's.

    The kernel ``W(x) = sum_k pi_k W_k`` and bias ``b(x) = sum_k pi_k b_k`` convolve each sample
    (see the module docstring for how).

    The temperature ``T`` is the plain attribute ``temperature`` (default
    ``DY_CONV_TEMPERATURE.start``, the paper's start value for training); anneal it with
    :class:`TemperatureSchedule` or set it with :func:`set_temperature`. Otherwise the arguments
    are ``nn.Conv2d``'s (``padding="same"`` by default, see :class:`ExpertConv2d`); ``strategy``
    is ``"auto"``, ``"aggregate"`` or ``"mix"``.

    Shapes: ``(N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        kernel_size: int = 3,
        padding: int | str = "same",
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 4,
        temperature: float = DY_CONV_TEMPERATURE.start,
        reduction: float = 4,
        attention_bias: bool = True,
        attention_width: AttentionWidth = "paper",
        strategy: Strategy = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, stride, num_experts=num_experts,
            kernel_size=kernel_size, padding=padding, dilation=dilation, groups=groups,
            bias=bias, strategy=strategy,
        )
        name = type(self).__name__
        check_positive_number(name, "reduction", reduction)
        check_choice(name, "attention_width", attention_width, ATTENTION_WIDTHS)
        check_bool(name, "attention_bias", attention_bias)
        self.temperature = float(check_positive_number(name, "temperature", temperature))
        if attention_width == "paper":
            self.hidden_channels = max(int(in_channels / reduction), num_experts)
        else:
            self.hidden_channels = num_experts if in_channels == 3 else \
                int(in_channels / reduction) + 1
        self.fc1 = nn.Linear(in_channels, self.hidden_channels, bias=attention_bias)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(self.hidden_channels, num_experts)
        self.place(device, dtype)

    conv_preservation = None

    def init_from_conv(self, conv: nn.Conv2d) -> None:
        """Softmax attention sums to 1, so experts all equal to ``W`` give ``W(x) = W`` for every x.

        The attention keeps its random initialisation: the routing differs per sample and per
        expert, so the experts' gradients differ from the first step and they diverge.
        """
        self.load_conv_experts(conv, 1.0)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """Attention ``pi(x)`` over the kernels, ``(N, K)``, summing to 1 per sample."""
        logits = self.fc2(self.act(self.fc1(x.mean(dim=(2, 3)))))
        return torch.softmax(logits / self.temperature, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.mixture_conv(x, self.routing(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}"


@register_block(
    "dynamic_conv_bn_act",
    kind="block",
    paper="Dynamic Convolution: Attention over Convolution Kernels",
    arxiv="1912.03458",
    year=2020,
    summary="DY-Conv followed by BatchNorm and ReLU, the form the paper always uses.",
    notes="exports with the 'mix' strategy (ONNX Conv groups cannot follow a dynamic batch).",
)
class DynamicConvBnAct(Block):
    """DY-Conv + BatchNorm + ReLU (Chen et al., arXiv 1912.03458).

    The paper replaces every ``conv -> BN -> ReLU`` of a network by ``DY-Conv -> BN -> ReLU``;
    this is that unit: ``act(bn(conv(x)))`` with a bias-free :class:`DynamicConv2d` (``conv``,
    options passed through), ``norm_layer="batchnorm"`` (``bn``) and ``act_layer="relu"``
    (``act``).

    Shapes: ``(N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))``.
    """

    allowed_strides = (1, 2)

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        kernel_size: int = 3,
        dilation: int = 1,
        groups: int = 1,
        num_experts: int = 4,
        temperature: float = DY_CONV_TEMPERATURE.start,
        reduction: float = 4,
        attention_bias: bool = True,
        attention_width: AttentionWidth = "paper",
        strategy: Strategy = "auto",
        norm_layer: LayerSpec = "batchnorm",
        act_layer: LayerSpec = "relu",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, stride)
        self.check_layers(norm_layer=norm_layer, act_layer=act_layer)
        self.conv = DynamicConv2d(
            in_channels, self.out_channels, stride, kernel_size=kernel_size, dilation=dilation,
            groups=groups, bias=False, num_experts=num_experts, temperature=temperature,
            reduction=reduction, attention_bias=attention_bias, attention_width=attention_width,
            strategy=strategy,
        )
        self.bn = create_norm(norm_layer, self.out_channels)
        self.act = create_act(act_layer, inplace=not isinstance(self.bn, nn.Identity))
        self.place(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.act(self.bn(self.conv(x)))

    def explain(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The dynamic conv's routing weights ``(N, K)`` and aggregated kernels."""
        return self.conv.explain(x)


@register_block(
    "cond_conv",
    paper="CondConv: Conditionally Parameterized Convolutions for Efficient Inference",
    arxiv="1904.04971",
    year=2019,
    summary="Convolves each sample with a sigmoid-routed sum of E expert kernels.",
    notes="exports with the 'mix' strategy (ONNX Conv groups cannot follow a dynamic batch).",
    **_CONV,
)
class CondConv2d(ExpertConv2d):
    """Conditionally parameterised convolution, CondConv (Yang et al., arXiv 1904.04971).

    ``E`` experts (default 8), routing ``r(x) = sigmoid(FC(dropout(mean_hw(x))))`` with
    ``FC: C_in -> E`` (with bias): independent gates, no softmax and no temperature, so the
    weights need not sum to 1. ``W(x) = sum_e r_e W_e``, ``b(x) = sum_e r_e b_e``. ``dropout``
    (default 0, off) is applied to the pooled routing input.

    ``forward(x, routing_weights)`` takes the routing from outside (shape ``(N, E)``, or
    ``(1, E)`` for one routing shared by the batch, which is a single ordinary convolution), so
    one routing function can drive several convolutions, as in the paper's CondConv-EfficientNet.
    Other arguments are ``nn.Conv2d``'s (see :class:`ExpertConv2d`).

    Shapes: ``(N, C_in, H, W) -> (N, C_out, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        stride: int = 1,
        *,
        kernel_size: int = 3,
        padding: int | str = "same",
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        num_experts: int = 8,
        dropout: float = 0.0,
        strategy: Strategy = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, stride, num_experts=num_experts,
            kernel_size=kernel_size, padding=padding, dilation=dilation, groups=groups,
            bias=bias, strategy=strategy,
        )
        check_fraction(type(self).__name__, "dropout", dropout)
        self.routing_dropout = nn.Dropout(dropout)
        self.routing_fn = nn.Linear(in_channels, num_experts)
        self.place(device, dtype)

    conv_preservation = None

    @torch.no_grad()
    def init_from_conv(self, conv: nn.Conv2d) -> None:
        """Sigmoid routing need not sum to 1; pairing the routing rows makes it sum to ``E / 2``.

        Routing row ``e + E//2`` is set to minus row ``e`` (weight and bias), so that
        ``r_e + r_{e + E//2} = sigmoid(z) + sigmoid(-z) = 1`` for every input; with ``E`` odd the
        last row is zeroed (``r = 1/2``). Then ``sum_e r_e = E / 2`` for every input and experts
        all equal to ``(2 / E) W`` give ``W(x) = W`` exactly. The routing stays random and
        input-dependent (half of its rows keep their initialisation), so the experts diverge from
        the first step; zeroing the routing instead would make every expert receive the same
        update forever.
        """
        fc, e = self.routing_fn, self.num_experts
        half = e // 2
        fc.weight[half:2 * half] = -fc.weight[:half]
        fc.bias[half:2 * half] = -fc.bias[:half]
        if e % 2:
            fc.weight[-1] = 0.0
            fc.bias[-1] = 0.0
        self.load_conv_experts(conv, 2.0 / e)

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """Routing weights ``sigmoid(FC(dropout(mean_hw(x))))``, ``(N, E)``."""
        return torch.sigmoid(self.routing_fn(self.routing_dropout(x.mean(dim=(2, 3)))))

    def forward(
        self, x: torch.Tensor, routing_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        self.check_input(x)
        if routing_weights is None:
            routing_weights = self.routing(x)
        else:
            self._check_routing(routing_weights, x)
        return self.mixture_conv(x, routing_weights)

    def _check_routing(self, routing: object, x: torch.Tensor) -> None:
        batch = x.shape[0]
        e = self.num_experts
        if not isinstance(routing, torch.Tensor) or not routing.is_floating_point():
            got = routing.dtype if isinstance(routing, torch.Tensor) else type(routing).__name__
            raise ValueError(
                f"CondConv2d: routing_weights must be a floating-point tensor of shape "
                f"({batch}, {e}) or (1, {e}), got {got}"
            )
        if routing.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"CondConv2d: routing_weights must have the input's dtype {x.dtype} outside "
                f"autocast, got {routing.dtype}"
            )
        if routing.dim() != 2 or routing.shape[0] not in (1, batch) or routing.shape[1] != e:
            raise ValueError(
                f"CondConv2d: routing_weights must have shape (N, num_experts) = ({batch}, {e}) "
                f"or (1, {e}), got {tuple(routing.shape)}"
            )


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Set the softmax temperature of every :class:`DynamicConv2d` in ``model`` (itself included).

    Returns how many were set; a non-positive or non-finite temperature is a ``ValueError``.
    """
    check_positive_number("set_temperature", "temperature", temperature)
    count = 0
    for module in model.modules():
        if isinstance(module, DynamicConv2d):
            module.temperature = float(temperature)
            count += 1
    return count


class TemperatureSchedule:
    """Linear temperature annealing of every :class:`DynamicConv2d` in a model (DY-Conv paper).

    The paper trains with ``T`` reduced linearly from 30 to 1 over the first 10 epochs (the
    defaults, :data:`DY_CONV_TEMPERATURE`):

        ``T(epoch) = start + (end - start) * min(epoch, epochs) / epochs``

    so epoch 0 runs at ``start``, epoch ``epochs`` and every later one at ``end`` (the value is
    clamped after the end). Constructing the schedule applies epoch 0. ``step(epoch)`` applies
    the given (0-based) epoch; ``step()`` without an argument advances by one epoch, like a
    learning-rate scheduler called once at the end of each epoch. Both return the temperature set.
    A model without any :class:`DynamicConv2d` is a ``ValueError``.
    """

    def __init__(
        self,
        model: nn.Module,
        start: float = DY_CONV_TEMPERATURE.start,
        end: float = DY_CONV_TEMPERATURE.end,
        epochs: int = DY_CONV_TEMPERATURE.epochs,
    ) -> None:
        check_positive_number("TemperatureSchedule", "start", start)
        check_positive_number("TemperatureSchedule", "end", end)
        check_positive_int("TemperatureSchedule", "epochs", epochs)
        if not any(isinstance(m, DynamicConv2d) for m in model.modules()):
            raise ValueError("TemperatureSchedule: the model holds no DynamicConv2d")
        self.model = model
        self.start = float(start)
        self.end = float(end)
        self.epochs = epochs
        self.last_epoch = 0
        self.step(0)

    def temperature_at(self, epoch: int) -> float:
        """The temperature of (0-based) ``epoch``."""
        check_non_negative_int("TemperatureSchedule", "epoch", epoch)
        return self.start + (self.end - self.start) * min(epoch, self.epochs) / self.epochs

    def step(self, epoch: int | None = None) -> float:
        """Apply ``epoch`` (default: the epoch after the last one applied) to the model."""
        epoch = self.last_epoch + 1 if epoch is None else epoch
        temperature = self.temperature_at(epoch)
        set_temperature(self.model, temperature)
        self.last_epoch = epoch
        return temperature
