"""Do test-time augmentation and ensembling pay off? Three Fashion-MNIST models, each with and
without TTA, and their ensemble, with and without TTA, in one table.

1. Train `imgtrain_cnn_small` three times with the `fashion_mnist` recipe (hflip and pad_crop
   augmentation, so a flipped view is one the model has learnt to read), differing only in
   `train.seed` (initialisation, shuffling, augmentation): a stratified `--images` training
   subset at `--img-size` pixels, `--epochs` epochs, one torch thread each.
2. `imgtrain ensemble`'s code (evaluation/ensemble.py's run_ensemble) measures each model and the
   soft-vote ensemble (equal weights) on the full 10,000-image test split, once without TTA and
   once with `--tta hflip` (2 views, mean of probabilities).

    python benchmarks/tta_ensemble.py [--images 10000] [--epochs 8] [--img-size 28] [--seeds 0,1,2]
                                      [--threads 2] [--runs DIR]

About 12 minutes on a quiet 2-core CPU (README has the measured time); `--runs DIR` reuses the
three run folders a previous run left in DIR (seed0, seed1, seed2) and only measures (a minute).

Goals (issue 6): TTA above no-TTA for each model; the ensemble above its best member.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from imgtrain.api import train
from imgtrain.config import load_recipe
from imgtrain.evaluation.ensemble import EnsembleOptions, run_ensemble

MODEL = "imgtrain_cnn_small"


def train_member(seed: int, args: argparse.Namespace, out: Path) -> Path:
    run_dir = out / f"seed{seed}"
    if (run_dir / "checkpoints" / "best.safetensors").is_file():
        print(f"seed {seed}: reusing {run_dir}", file=sys.stderr)
        return run_dir
    recipe = load_recipe("fashion_mnist", [
        f"model.name={MODEL}", f"augment.img_size={args.img_size}", "augment.pad_crop=1", "augment.hflip=0.5",
        f"data.train_subset={args.images}", "data.val_fraction=0.02", f"train.epochs={args.epochs}",
        f"train.threads={args.threads}", f"train.seed={seed}", "output.progress=off", "output.plots=false",
        "output.report=false"])
    started = time.perf_counter()
    result = train(recipe, run_dir=run_dir)
    print(f"seed {seed}: test accuracy {result.summary['test_acc']:.2%}, {time.perf_counter() - started:.0f} s",
          file=sys.stderr)
    return run_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10000, help="training images (stratified subset)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=28, help="pixels the models see")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed of each model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", help="folder of the run folders (reused when there; default: a temporary folder)")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    out = Path(args.runs or tempfile.mkdtemp(prefix="imgtrain_tta_ensemble_"))
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [train_member(seed, args, out) for seed in seeds]
    trained = time.perf_counter()
    plain = run_ensemble(runs, EnsembleOptions(split="test"))
    tta = run_ensemble(runs, EnsembleOptions(split="test", tta=["hflip"]))
    measured = time.perf_counter()

    print(f"\nFashion-MNIST, {args.images} training images, {args.img_size} px, {MODEL}, {args.epochs} epochs, "
          f"hflip + pad_crop 1 in training; test split {plain['images']:,} images; TTA {tta['tta']}")
    print(f"{'model':<22}{'acc':>9}{'acc TTA':>10}{'TTA - no TTA':>14}{'loss':>9}{'loss TTA':>10}")
    rows = [(f"seed {seed}", p, t) for seed, p, t in zip(seeds, plain["members"], tta["members"])]
    rows.append((f"ensemble of {len(seeds)} (soft)", plain["ensemble"], tta["ensemble"]))
    for name, p, t in rows:
        print(f"{name:<22}{p['acc']:>9.2%}{t['acc']:>10.2%}{(t['acc'] - p['acc']) * 100:>+13.2f} "
              f"{p['loss']:>9.4f}{t['loss']:>10.4f}")
    best_plain = max(m["acc"] for m in plain["members"])
    best_tta = max(m["acc"] for m in tta["members"])
    gain_plain = (plain["ensemble"]["acc"] - best_plain) * 100
    gain_tta = (tta["ensemble"]["acc"] - best_tta) * 100
    print(f"{'ensemble - best member':<22}{gain_plain:>+8.2f} {gain_tta:>+9.2f}")
    tta_wins = sum(t["acc"] > p["acc"] for _, p, t in rows[:-1])
    print(f"goal TTA above no TTA for each model: {tta_wins}/{len(seeds)} "
          f"({'met' if tta_wins == len(seeds) else 'NOT met'}); goal ensemble above its best member: "
          f"{'met' if gain_plain > 0 and gain_tta > 0 else 'NOT met'} ({gain_plain:+.2f} points without TTA, "
          f"{gain_tta:+.2f} with)")
    print(f"training {trained - started:.0f} s, measuring {measured - trained:.0f} s, total "
          f"{measured - started:.0f} s; run folders in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
