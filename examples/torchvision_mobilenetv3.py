"""Coordinate attention and dynamic convolution in a torchvision MobileNetV3-Small.

    python examples/torchvision_mobilenetv3.py                        # random weights
    python examples/torchvision_mobilenetv3.py --weights IMAGENET1K_V1    # downloads the weights

1. Coordinate attention after the depthwise conv of every inverted residual, where the
   coordinate attention paper puts it in MobileNetV2. The module there is torchvision's
   ``Conv2dNormActivation``, whose ``out_channels`` gives the block its width. The block is not
   the identity when fresh, so it goes in as a gated residual with gamma = 0.
2. Dynamic convolution (DY-Conv) for the 1x1 projection convs of the last stage (the paper
   makes every conv of DY-MobileNet dynamic; its experts start as the pretrained kernel).
   The dynamic convs start at softmax temperature 30: when fine-tuning, anneal it with
   ``bz.TemperatureSchedule(model, epochs=10)`` stepped once per epoch (as in
   ``torchvision_resnet.py``).
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation

from blockzoo.surgery import insert_after, replace_convs


def is_depthwise(module: nn.Module) -> bool:
    """A torchvision conv-BN-act whose conv is depthwise."""
    if not isinstance(module, Conv2dNormActivation):
        return False
    return module[0].groups == module[0].in_channels > 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None,
                        help="torchvision weights, e.g. IMAGENET1K_V1 (downloads); default random")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    args = parser.parse_args(argv)

    model = torchvision.models.mobilenet_v3_small(weights=args.weights).eval()
    x = torch.randn(2, 3, args.size, args.size)
    with torch.no_grad():
        before = model(x)

    print(insert_after(model, "coord_att", where=lambda name, module: is_depthwise(module)))
    last_stage = tuple(f"features.{i}." for i in (9, 10, 11))
    print(replace_convs(
        model, "dynamic_conv",
        where=lambda name, conv: name.startswith(last_stage) and name.endswith("block.3.0"),
    ))

    with torch.no_grad():
        change = (model(x) - before).abs().max().item()
    print(f"largest output change after surgery: {change:.2e} (outputs were up to "
          f"{before.abs().max().item():.2e})")


if __name__ == "__main__":
    main()
