"""PNG grid of a few training samples of each generated Fashion-MNIST variant (and of the plain data).

    python scripts/sample_grid.py                       # -> docs/results/datasets.png
    python scripts/sample_grid.py --n 10 --out grid.png --split test

One row per variant, the first ``--n`` images of the chosen split, each titled with its class; the decorrelated
test split of tint/decoy (``--split test``) shows artefact levels that no longer match the class.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from siftguide.data import FASHION_MNIST_CLASSES, FashionMNISTDataModule  # noqa: E402
from siftguide.data.synthetic import (ClutteredFashionMNISTDataModule, DecoyFashionMNISTDataModule,  # noqa: E402
                                 TintedFashionMNISTDataModule, TranslatedFashionMNISTDataModule)

ROWS = {
    "fashion_mnist": FashionMNISTDataModule,
    "fashion_mnist_translated": TranslatedFashionMNISTDataModule,
    "fashion_mnist_cluttered": ClutteredFashionMNISTDataModule,
    "fashion_mnist_tint": TintedFashionMNISTDataModule,
    "fashion_mnist_decoy": DecoyFashionMNISTDataModule,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=8, help="images per variant")
    ap.add_argument("--split", choices=("train", "val", "test"), default="train")
    ap.add_argument("--out", default="docs/results/datasets.png")
    ap.add_argument("--root", default=None, help="folder with the Fashion-MNIST *.gz files (default: auto)")
    args = ap.parse_args()

    fig, axes = plt.subplots(len(ROWS), args.n, figsize=(1.3 * args.n, 1.45 * len(ROWS)), squeeze=False)
    for r, (name, cls) in enumerate(ROWS.items()):
        t0 = time.perf_counter()
        dm = cls(root=args.root, val_size=max(args.n, 16), train_subset=max(args.n, 16), download=False)
        dm.setup()
        ds = getattr(dm, f"{args.split}_set")
        print(f"{name}: {tuple(ds.images.shape[1:])} uint8, setup {time.perf_counter() - t0:.1f} s")
        for c in range(args.n):
            ax = axes[r, c]
            ax.imshow(ds.images[c, 0].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(FASHION_MNIST_CLASSES[int(ds.labels[c])], fontsize=7)
        axes[r, 0].set_ylabel(name.replace("fashion_mnist_", "").replace("fashion_mnist", "plain"), fontsize=8)
    fig.suptitle(f"Fashion-MNIST and its generated variants, {args.split} split (row X: data=fashion_mnist_X)",
                 fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
