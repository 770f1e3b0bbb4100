"""Compress, then adapt, end to end on a real data set in under a minute on a CPU.

Trains an MLP on scikit-learn's bundled 8x8 handwritten digits, binarizes (int1) or
block-sparsifies (sparse4x4) its Linear layers, measures the accuracy lost, trains LoRA
adapters on the frozen compressed base to win it back, and checks that save/load restores
the result exactly.  Usage: ``python examples/quickstart.py [--compression sparse4x4] [--rank 4]``.
"""

import argparse
import tempfile

import torch
from sklearn.datasets import load_digits
from torch import nn

import loraq


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def fit(model, x, y, epochs, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compression", default="int1", choices=["int1", "sparse4x4", "dense"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--init", default="svd", choices=["gaussian", "svd", "loftq"])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    if args.epochs < 0:
        parser.error(f"--epochs must be at least 0, got {args.epochs}")
    init = "gaussian" if args.compression == "dense" else args.init
    try:  # a bad option fails now, not after the dense model's pretraining
        # clip_rank: above 10, the 10-wide head gets a full-rank adapter (as in `loraq demo`), not an error
        config = loraq.CompressionConfig(compression=args.compression, rank=args.rank, init=init,
                                         clip_rank=True)
    except ValueError as e:
        parser.error(str(e))

    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    train, test = perm[:1400], perm[1400:]

    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    fit(model, x[train], y[train], epochs=20, lr=1e-3)
    dense_acc = accuracy(model, x[test], y[test])

    report = loraq.compress_(model, config)
    print(report)
    for m in model.modules():
        if isinstance(m, loraq.LoraLinear):
            m.disable_adapter()
    compressed_acc = accuracy(model, x[test], y[test])
    for m in model.modules():
        if isinstance(m, loraq.LoraLinear):
            m.enable_adapter()
    init_acc = accuracy(model, x[test], y[test])
    fit(model, x[train], y[train], epochs=args.epochs, lr=2e-3)
    lora_acc = accuracy(model, x[test], y[test])

    print(loraq.footprint(model))
    print(f"\ntest accuracy  dense {dense_acc:.3f} | {args.compression} without LoRA {compressed_acc:.3f} | "
          f"+ LoRA r={args.rank} at init ({init}) {init_acc:.3f} | after training the adapters {lora_acc:.3f}")

    with tempfile.TemporaryDirectory() as folder:
        loraq.save(model, folder)
        fresh = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        loraq.load(fresh, folder)
        same = torch.equal(fresh.eval()(x[test]), model.eval()(x[test]))
        print(f"save/load round trip exact: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
