"""Train your own CNN on your own data with the paper's hybrid parallelism, from Python.

    python examples/fit_own_model.py [--workers 2] [--epochs 3] [--out runs/example]

The model is a plain nn.Module with torchvision-style ``features`` (the convolutional
trunk: data-parallel) and ``classifier`` (the fully-connected head: split by neurons over
the workers). The data are scikit-learn's bundled 8x8 handwritten digits (1 channel) as
torch TensorDatasets. Classes are defined at module level and the work happens under
``if __name__ == "__main__"``: the workers are spawned processes that unpickle the model
and the data sets.
"""
from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

import onetrick


class DigitsNet(nn.Module):
    """Two convolutions, then a 256-wide fully-connected head (its first layer without bias)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 8x8 -> 4x4
                                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(32 * 4 * 4, 256, bias=False), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(256, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def digits() -> tuple[TensorDataset, TensorDataset]:
    """The 1,797 digits as (1, 8, 8) images in [0, 1]; the last 360 are the test set."""
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(y)
    return TensorDataset(images[:-360], labels[:-360]), TensorDataset(images[-360:], labels[-360:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--out", default="runs/example")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = DigitsNet()
    train_set, test_set = digits()
    summary = onetrick.fit(model, train_set, test_set, workers=args.workers, strategy="hybrid", scheme="b",
                           batch=16, epochs=args.epochs, lr=0.05, eval_every=50, out=args.out, progress=False)
    print(f"test top-1 error {summary['top1_error']:.2%} after {summary['steps']} steps on {args.workers} workers")

    # `model` now holds the trained weights; an export of the run loads into a fresh instance.
    from onetrick.run.export import export_run

    path = export_run(args.out)
    again = onetrick.load(path, model=DigitsNet())
    images, labels = test_set.tensors
    with torch.no_grad():
        same = torch.equal(again(images).argmax(1), model.eval()(images).argmax(1))
    print(f"exported to {path}; reloaded model agrees with the trained one: {same}")


if __name__ == "__main__":
    main()
