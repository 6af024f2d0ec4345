"""Does curriculum learning pay off at equal epochs? Plain training against curricula on Fashion-MNIST.

Every recipe trains `imgtrain_cnn_tiny` on the same stratified subset of Fashion-MNIST's
training images (`--images`, 28 px, the `fashion_mnist` recipe's augmentation and one-cycle
SGD) for the same epochs and seed, and is scored on the full test split (10,000 images).
The epoch length is the same in every recipe (a curriculum draws len(train) images per
epoch from its pool), so every recipe takes the same optimizer steps:

   plain                  no curriculum
   self-paced, linear     the model's own running loss, linear pacing 0.3 -> 1 by half the epochs
   self-paced, root       the same with root pacing (grows faster early)
   reference, linear      the loss of the plain run's model (trained first, same budget)
   reference, step        the same, two steps: 0.3, 0.65, then all

    python benchmarks/curriculum.py [--images 5000] [--epochs 6] [--seed 0]

About 5 minutes on 2 quiet CPU cores (17 minutes for the README's table, on a shared machine).
No goal is set by the issue; the table is reported as measured, one seed.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

from imgtrain.api import train
from imgtrain.config import load_recipe

RECIPES = {
    "plain": [],
    "self-paced, linear": ["curriculum.difficulty=self_paced", "curriculum.pacing=linear"],
    "self-paced, root": ["curriculum.difficulty=self_paced", "curriculum.pacing=root"],
    "reference, linear": ["curriculum.difficulty=reference", "curriculum.reference=REFERENCE",
                          "curriculum.pacing=linear"],
    "reference, step": ["curriculum.difficulty=reference", "curriculum.reference=REFERENCE",
                        "curriculum.pacing=step", "curriculum.step_count=2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000, help="training images (stratified subset)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    common = ["model.name=imgtrain_cnn_tiny", "model.drop_rate=0", "output.progress=off", "output.plots=false",
              "data.val_fraction=0.02", f"data.train_subset={args.images}", f"train.epochs={args.epochs}",
              f"train.seed={args.seed}", "curriculum.start_fraction=0.3", "curriculum.end_point=0.5"]
    if args.threads:
        common.append(f"train.threads={args.threads}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for name, overrides in RECIPES.items():
            keys = [f"curriculum.reference={reference}" if o.endswith("=REFERENCE") else o for o in overrides]
            recipe = load_recipe("fashion_mnist", common + keys)
            started = time.perf_counter()
            result = train(recipe, run_dir=Path(tmp) / name.replace(", ", "_").replace(" ", "_"),
                           console=io.StringIO())
            seconds = time.perf_counter() - started
            if reference is None:
                reference = result.run_dir
            fractions = " ".join(f"{r.get('curriculum_fraction', 1.0):.2f}" for r in result.history)
            rows.append((name, result.summary["test_acc"], seconds, fractions))
            print(f"  {name}: {result.summary['test_acc']:.2%}, {seconds:.0f} s", file=sys.stderr)
    plain = rows[0][1]
    print(f"\ncurriculum: Fashion-MNIST, {args.images} training images, imgtrain_cnn_tiny, {args.epochs} epochs "
          f"each, seed {args.seed}, start_fraction 0.3, end_point 0.5, test split (10,000 images)")
    print(f"{'recipe':<20s}{'test acc':>9s}{'vs plain':>10s}{'seconds':>9s}  fraction per epoch")
    for name, acc, seconds, fractions in rows:
        print(f"{name:<20s}{acc:>9.2%}{(acc - plain) * 100:>+9.2f} {seconds:>8.0f}  {fractions}")


if __name__ == "__main__":
    main()
