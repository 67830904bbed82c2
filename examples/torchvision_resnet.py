"""Put blockzoo blocks into a torchvision ResNet-18 without changing what it computes.

    python examples/torchvision_resnet.py                       # random weights, 224x224
    python examples/torchvision_resnet.py --weights IMAGENET1K_V1   # downloads the weights

Two edits, each function-preserving, so a pretrained network keeps its accuracy until
fine-tuning starts:

1. squeeze-excitation on the residual branch of every block, after its last BatchNorm and
   before the addition (the SE-ResNet placement), inserted as a gated residual with gamma = 0;
2. dynamic convolution for the 3x3 convs of the last two stages, every expert starting as the
   pretrained kernel.

Then a fine-tuning loop (random images stand in for your data loader) with the one line that
DY-Conv needs: the dynamic convs start at softmax temperature 30 (near-uniform routing), and
``bz.TemperatureSchedule(model, epochs=10)``, stepped once per epoch, anneals it to 1 over ten
epochs as the paper does. Without it the routing stays almost static.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision

import blockzoo as bz
from blockzoo.surgery import insert_after, replace_convs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None,
                        help="torchvision weights, e.g. IMAGENET1K_V1 (downloads); default random")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--epochs", type=int, default=2,
                        help="fine-tuning epochs to run (one random batch each)")
    args = parser.parse_args(argv)

    model = torchvision.models.resnet18(weights=args.weights).eval()
    x = torch.randn(2, 3, args.size, args.size)
    with torch.no_grad():
        before = model(x)

    print(insert_after(model, "se", where=lambda name, module: name.endswith("bn2")))
    print(replace_convs(
        model, "dynamic_conv",
        where=lambda name, conv: name.startswith(("layer3", "layer4"))
        and conv.kernel_size == (3, 3),
    ))

    with torch.no_grad():
        change = (model(x) - before).abs().max().item()
    print(f"largest output change after surgery: {change:.2e} (outputs were up to "
          f"{before.abs().max().item():.2e})")

    # Fine-tuning: anneal the DY-Conv temperature 30 -> 1 over 10 epochs, one step per epoch.
    schedule = bz.TemperatureSchedule(model, epochs=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for epoch in range(args.epochs):
        for images, labels in [(torch.randn(2, 3, args.size, args.size), torch.tensor([0, 1]))]:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"epoch {epoch}: loss {loss.item():.3f}, DY-Conv temperature "
              f"{schedule.temperature_at(epoch):g} -> {schedule.step():g}")


if __name__ == "__main__":
    main()
