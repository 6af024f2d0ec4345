"""Does transfer learning pay off with few images? Pretrain on Fashion-MNIST, fine-tune on digits.

1. Pretrain `imgtrain_cnn_small` on Fashion-MNIST (`--pretrain-images` training images,
   `--pretrain-epochs` epochs, 28 px, grey), or reuse a run folder (`--pretrained RUN_DIR`).
2. Fine-tune on scikit-learn's 8x8 digits, upsampled to 28 px, using 10% of its training
   images (stratified, `data.train_subset`); the full digits test split (20% of the set)
   scores each recipe. Every recipe trains the same epochs with the same seed:

   scratch             random initialisation, every layer trains
   frozen backbone     the pretrained weights, only the new head trains (feature extraction)
   full fine-tune      the pretrained weights, every layer at the same lr
   discriminative lrs  the pretrained weights, lr x 0.3 per layer group towards the stem
   gradual unfreezing  head alone for the first epoch, then every group (freeze_epochs: 1), layer decay 0.5

    python benchmarks/transfer.py [--epochs 5,15] [--fraction 0.1] [--pretrained RUN_DIR]

About 4 minutes on 2 CPU cores (the pretraining is most of it).

Goal (issue 4): the best transfer recipe at least 5 points of test accuracy above scratch.
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

COMMON = ["model.name=imgtrain_cnn_small", "augment.img_size=28", "output.progress=off", "output.plots=false",
          "train.label_smoothing=0.1", "data.batch_size=16"]

RECIPES = {
    "scratch": ["optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.01"],
    "frozen backbone": ["MODEL_WEIGHTS", "transfer.freeze_backbone=true", "optim.name=adamw", "optim.lr=0.01",
                        "optim.weight_decay=0.01"],
    "full fine-tune": ["MODEL_WEIGHTS", "optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.01"],
    "discriminative lrs": ["MODEL_WEIGHTS", "transfer.layer_decay=0.3", "optim.name=adamw", "optim.lr=0.003",
                           "optim.weight_decay=0.01"],
    "gradual unfreezing": ["MODEL_WEIGHTS", "transfer.freeze_epochs=1", "transfer.layer_decay=0.5",
                           "optim.name=adamw", "optim.lr=0.003", "optim.weight_decay=0.01"],
}


def pretrain(out: Path, images: int, epochs: int) -> Path:
    recipe = load_recipe("fashion_mnist", ["output.progress=off", "output.plots=false", f"train.epochs={epochs}",
                                           f"data.train_subset={images}", "data.val_fraction=0.05"])
    started = time.perf_counter()
    result = train(recipe, run_dir=out / "pretrain")
    print(f"pretrained imgtrain_cnn_small on {images} Fashion-MNIST images, {epochs} epochs: "
          f"val accuracy {result.summary['best_val_acc']:.2%}, {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    return result.run_dir


def digits_train_count() -> int:
    from imgtrain.data import build_splits
    return len(build_splits(load_recipe("quickstart").data).train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", default="5,15", help="fine-tuning epochs, every recipe; a comma list "
                                                         "prints one table per budget")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of digits' training images used")
    parser.add_argument("--pretrained", help="a Fashion-MNIST run folder to start from (skips pretraining)")
    parser.add_argument("--pretrain-images", type=int, default=20000)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        weights = Path(args.pretrained) if args.pretrained else pretrain(out, args.pretrain_images,
                                                                         args.pretrain_epochs)
        subset = max(10, round(digits_train_count() * args.fraction))
        tables = [(int(e), run_budget(out, weights, subset, int(e), args.seed)) for e in args.epochs.split(",")]
    met = False
    for epochs, rows in tables:
        scratch = rows[0][1]
        print(f"\ntransfer: Fashion-MNIST -> digits ({subset} training images = {args.fraction:.0%}, 28 px, "
              f"batch 16), imgtrain_cnn_small, {epochs} epochs each, seed {args.seed}, digits test split "
              f"(360 images)")
        print(f"{'recipe':<22s}{'test acc':>9s}{'vs scratch':>12s}{'seconds':>9s}  keys")
        for name, acc, seconds, keys in rows:
            print(f"{name:<22s}{acc:>9.2%}{(acc - scratch) * 100:>+11.1f} {seconds:>8.0f}  {keys}")
        best_name, best_acc = max(rows[1:], key=lambda r: r[1])[:2]
        gain = (best_acc - scratch) * 100
        met = met or gain >= 5
        print(f"best transfer recipe: {best_name} {gain:+.1f} points over scratch "
              f"(goal +5.0: {'met' if gain >= 5 else 'NOT met'} at {epochs} epochs)")


def run_budget(out: Path, weights: Path, subset: int, epochs: int, seed: int) -> list:
    rows = []
    for name, overrides in RECIPES.items():
        keys = [f"model.weights={weights}" if o == "MODEL_WEIGHTS" else o for o in overrides]
        recipe = load_recipe("quickstart", COMMON + keys + [f"train.epochs={epochs}", f"data.train_subset={subset}",
                                                            f"train.seed={seed}"])
        started = time.perf_counter()
        result = train(recipe, run_dir=out / f"{name.replace(' ', '_')}_{epochs}", console=io.StringIO())
        rows.append((name, result.summary["test_acc"], time.perf_counter() - started,
                     " ".join(k for k in keys if not k.startswith(("model.weights", "optim.weight_decay")))))
        print(f"  {epochs} epochs, {name}: {result.summary['test_acc']:.2%}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
