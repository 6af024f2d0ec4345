"""Do SWA, SAM and a self-paced curriculum earn their place? Clean and noisy labels on Fashion-MNIST.

Every arm trains `imgtrain_cnn_small` with the `fashion_mnist` recipe's augmentation and one-cycle SGD
on the same stratified 10,000 training images (`--images`) for the same epochs, and is scored on the
full, clean test split (10,000 images). Each arm runs twice: on the true labels, and with `--noise`
(20%) of the training labels replaced by a different class drawn at random (seeded here, before the
subset is taken: the validation images carved from train are noisy too, the test split never is):

   plain        the recipe as it is
   swa          stochastic weight averaging over the last quarter of the epochs (swa.lr 0.05)
   sam          sharpness-aware minimisation, optim.sam.rho 0.05 (two passes per step)
   curriculum   self-paced curriculum, linear pacing from 30% of the images to all by half the run

The literature (Foret et al. 2021, Izmailov et al. 2018, Jiang et al. 2018) says these help most
under label noise. The table gives the median test accuracy over `--seeds` seeds, its change against
plain on the same labels, and the wall time of training with its ratio to plain. No goal is set:
the numbers are reported as measured.

    python benchmarks/robustness.py [--images 10000] [--epochs 8] [--seeds 2] [--noise 0.2]
"""

from __future__ import annotations

import argparse
import gzip
import io
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from imgtrain.api import train
from imgtrain.config import load_recipe
from imgtrain.data.sources import FASHION_MNIST_DIR, read_idx

ARMS = {
    "plain": lambda epochs: [],
    "swa": lambda epochs: [f"swa.start_epoch={max(1, epochs - max(1, epochs // 4))}", "swa.lr=0.05",
                           "swa.anneal_epochs=1"],
    "sam": lambda epochs: ["optim.sam={rho: 0.05, adaptive: false}"],
    "curriculum": lambda epochs: ["curriculum.difficulty=self_paced", "curriculum.pacing=linear",
                                  "curriculum.start_fraction=0.3", "curriculum.end_point=0.5"],
}


def flip_labels(labels: np.ndarray, fraction: float, classes: int, seed: int) -> np.ndarray:
    """`fraction` of the labels replaced by a different class, uniformly at random (seeded)."""
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    chosen = rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)
    noisy[chosen] = (labels[chosen] + rng.integers(1, classes, size=len(chosen))) % classes
    return noisy


def noisy_copy(source: Path, target: Path, fraction: float, seed: int) -> float:
    """The four IDX files in `target`, the training labels flipped; returns the fraction flipped."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(source / name, target / name)
    labels = read_idx(source / "train-labels-idx1-ubyte.gz")
    noisy = flip_labels(labels, fraction, 10, seed)
    header = bytes([0, 0, 8, 1]) + len(noisy).to_bytes(4, "big")
    with gzip.open(target / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(header + noisy.astype(np.uint8).tobytes())
    return float((noisy != labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000, help="training images (stratified subset)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.2, help="fraction of training labels flipped")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",")]
    common = ["data.val_fraction=0.05", f"data.train_subset={args.images}", f"train.epochs={args.epochs}",
              f"train.threads={args.threads}", "output.progress=off", "output.plots=false", "output.report=false"]
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        flipped = noisy_copy(Path(FASHION_MNIST_DIR), Path(tmp) / "noisy", args.noise, seed=1234)
        print(f"{flipped:.1%} of the 60,000 training labels flipped", file=sys.stderr)
        for labels, root in (("clean", FASHION_MNIST_DIR), ("noisy", str(Path(tmp) / "noisy"))):
            for seed in range(args.seeds):
                for arm in arms:
                    recipe = load_recipe("fashion_mnist", [*common, f"data.root={root}", f"train.seed={seed}",
                                                           *ARMS[arm](args.epochs)])
                    run = train(recipe, run_dir=Path(tmp) / f"{labels}-{arm}-{seed}", console=io.StringIO())
                    acc, seconds = run.summary["test_acc"], run.summary["training_seconds"]
                    results.setdefault((labels, arm), []).append((acc, seconds))
                    print(f"{labels:5s} {arm:10s} seed {seed}: test {acc:.2%}, {seconds:.0f} s", file=sys.stderr)
    print(f"\nrobustness: imgtrain_cnn_small, {args.images} Fashion-MNIST training images, {args.epochs} epochs, "
          f"median of {args.seeds} seed(s), {args.noise:.0%} of the training labels flipped in 'noisy'")
    print(f"{'labels':7s}{'arm':12s}{'test acc':>10s}{'vs plain':>10s}{'train s':>9s}{'x plain':>9s}")
    for labels in ("clean", "noisy"):
        base_acc = statistics.median(a for a, _ in results[(labels, "plain")]) if (labels, "plain") in results else None
        base_s = statistics.median(s for _, s in results[(labels, "plain")]) if (labels, "plain") in results else None
        for arm in arms:
            acc = statistics.median(a for a, _ in results[(labels, arm)])
            secs = statistics.median(s for _, s in results[(labels, arm)])
            delta = f"{100 * (acc - base_acc):+.2f}" if base_acc is not None and arm != "plain" else ""
            ratio = f"{secs / base_s:.2f}" if base_s else ""
            print(f"{labels:7s}{arm:12s}{acc:>10.2%}{delta:>10s}{secs:>9.0f}{ratio:>9s}")


if __name__ == "__main__":
    main()
