"""What does each augmentation buy on a small training set?

Fashion-MNIST with 5,000 training images (a stratified subset, `data.train_subset=5000`),
validation carved from the rest of the training split (picks the best epoch), test
accuracy on the full 10,000-image test set. Every variant trains the same model from the
same seed for the same number of epochs with the `fashion_mnist` recipe (one-cycle SGD,
label smoothing 0.1); only the augmentation differs:

    none          no augmentation at all
    geometric     the default geometric set: pad 2 + random crop, horizontal flip 0.5
    randaugment   geometric + RandAugment (2 ops, magnitude 9)
    mixup         geometric + Mixup (alpha 0.2)
    cutmix        geometric + CutMix (alpha 1.0)
    erasing       geometric + random erasing (p 0.25, area 2-33%, mean fill)

It prints test accuracy and the difference against "none" and against "geometric", all
measured in this run. With one seed, differences under about 0.5 points are within the
seed-to-seed spread; --seeds N averages N seeds.

    python benchmarks/augment.py [--epochs 10] [--model imgtrain_cnn_tiny] [--seeds 1] [--threads 1]

About 7 minutes with the defaults on a shared 2-core CPU (imgtrain_cnn_tiny, 26k parameters).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from imgtrain.api import train
from imgtrain.config import load_recipe

GEOMETRIC = ["augment.pad_crop=2", "augment.hflip=0.5"]
VARIANTS = {
    "none": ["augment.pad_crop=0", "augment.hflip=0"],
    "geometric": GEOMETRIC,
    "randaugment": GEOMETRIC + ["augment.policy=randaugment", "augment.num_ops=2", "augment.magnitude=9"],
    "mixup": GEOMETRIC + ["mix.mixup_alpha=0.2"],
    "cutmix": GEOMETRIC + ["mix.cutmix_alpha=1.0"],
    "erasing": GEOMETRIC + ["augment.erasing=0.25"],
}


def run(name: str, epochs: int, model: str, seed: int, threads: int, root: Path) -> dict:
    overrides = ["data.train_subset=5000", "data.val_fraction=0.05", f"train.epochs={epochs}",
                 f"model.name={model}", f"train.seed={seed}", f"train.threads={threads}",
                 "output.progress=off", "output.plots=false", *VARIANTS[name]]
    recipe = load_recipe("fashion_mnist", overrides)
    started = time.perf_counter()
    result = train(recipe, run_dir=root / f"{name}-{seed}")
    seconds = time.perf_counter() - started
    print(f"  {name:<12s} seed {seed}: test {result.summary['test_acc']:.4f}, {seconds:.0f} s", file=sys.stderr)
    return {"test_acc": result.summary["test_acc"], "best_val_acc": result.summary["best_val_acc"],
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--model", default="imgtrain_cnn_tiny")
    parser.add_argument("--seeds", type=int, default=1)
    # 1 thread: on a shared 2-core machine two threads per process oversubscribe and run slower
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="run only these variants")
    args = parser.parse_args()
    names = args.only or list(VARIANTS)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            runs = [run(name, args.epochs, args.model, seed, args.threads, Path(tmp)) for seed in range(args.seeds)]
            results[name] = {key: statistics.mean(r[key] for r in runs) for key in runs[0]}
    command = "python benchmarks/augment.py " + " ".join(sys.argv[1:])
    print(f"\naugmentation on 5,000 Fashion-MNIST training images: {args.model}, {args.epochs} epochs, "
          f"{args.seeds} seed(s), test accuracy on the 10,000 test images, {args.threads} CPU thread(s)")
    print(f"command: {command.strip()}")
    header = (f"{'variant':<13s}{'test acc':>10s}{'vs none':>10s}{'vs geometric':>14s}{'best val acc':>14s}"
              f"{'seconds':>9s}")
    print(header)
    print("-" * len(header))
    base, geo = results.get("none"), results.get("geometric")
    for name, r in results.items():
        vs_none = f"{100 * (r['test_acc'] - base['test_acc']):+.2f}" if base else "-"
        vs_geo = f"{100 * (r['test_acc'] - geo['test_acc']):+.2f}" if geo else "-"
        print(f"{name:<13s}{100 * r['test_acc']:>9.2f}%{vs_none:>10s}{vs_geo:>14s}"
              f"{100 * r['best_val_acc']:>13.2f}%{r['seconds']:>9.0f}")
    print("(differences in accuracy points; 'vs geometric' is what each addition buys over the default set)")


if __name__ == "__main__":
    main()
