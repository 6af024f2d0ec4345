"""What does `imgtrain tune` buy, and what does pruning save?

The built-in `fashion_mnist` recipe (Debian's dataset-fashion-mnist) on a stratified subset of the
training images (2,000 validation images, the metric; 1,000 test images), `imgtrain_cnn_small`, a
4-parameter space (lr, weight decay, dropout, batch size), studies of --trials trials of --epochs epochs:

    (a) the best trial of the TPE study against trial 0, the recipe's own values
    (b) TPE against random search at equal trials: the best validation accuracy, median over the seeds
    (c) ASHA pruning (TPE) against no pruning (TPE): epochs spent and the best validation accuracy

    python benchmarks/tune.py [--images 10000] [--trials 24] [--epochs 4] [--seeds 2] [--threads 2] [--out DIR]

With --out DIR the study folders are kept there, and running the same command again continues the studies
where they stopped (a killed trial is marked failed and queued again): the full setting can be spread over
several sittings. Without --out they live in a temporary folder.

The issue's setting (the defaults) is 6 studies of 24 trials of 4 epochs over 10,000 images: about
4 hours of 2 CPU cores. Each seed is passed as train.seed: it seeds the sampler and the training.

Goals (issue 15): pruning spends at most 0.6x the epochs for a best accuracy within 0.3 points;
TPE at least matches random search.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from imgtrain.config import load_recipe
from imgtrain.tuning import StudyResult, TuneOptions, tune

FASHION = Path("/usr/share/datasets/fashion-mnist")
SPACE = {
    "optim.lr": "tag(log, interval(0.01, 1.0))",
    "optim.weight_decay": "tag(log, interval(1e-5, 1e-2))",
    "model.drop_rate": "interval(0, 0.5)",
    "data.batch_size": "choice(64, 128, 256)",
}


def run_study(args: argparse.Namespace, root: Path, sampler: str, pruner: str, seed: int) -> StudyResult:
    overrides = [f"data.root={FASHION}", f"data.train_subset={args.images}", "data.val_subset=2000",
                 "data.test_subset=1000", f"train.threads={args.threads}", f"train.seed={seed}",
                 f"output.root={root}", "output.plots=false", "output.report=false", "output.progress=off",
                 f"search.sampler={sampler}", f"search.pruner={pruner}", f"search.budget={args.epochs}",
                 "search.params={" + ", ".join(f"'{k}': '{v}'" for k, v in SPACE.items()) + "}"]
    recipe = load_recipe("fashion_mnist", overrides)
    started = time.perf_counter()
    with open(os.devnull, "w") as quiet:
        result = tune(recipe, TuneOptions(trials=args.trials, study=f"{sampler}-{pruner}-seed{seed}", console=quiet))
    print(f"{sampler:>6s} {pruner:>5s} seed {seed}: best val_acc {best(result):.4f}, {epochs(result)} epochs, "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return result


def best(result: StudyResult) -> float:
    return max(row["val_acc"] for row in result.rows if row["state"] == "COMPLETE")


def epochs(result: StudyResult) -> int:
    return sum(row["epochs_run"] or 0 for row in result.rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000, help="training images (stratified subset)")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial (search.budget)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="keep the study folders here; the same command continues them")
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"needs Debian's dataset-fashion-mnist in {FASHION} (apt-get install -y dataset-fashion-mnist)")
    seeds = range(args.seeds)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out.resolve() if args.out else Path(tmp)
        tpe = [run_study(args, root, "tpe", "none", seed) for seed in seeds]
        rand = [run_study(args, root, "random", "none", seed) for seed in seeds]
        asha = [run_study(args, root, "tpe", "asha", seed) for seed in seeds]
    defaults = statistics.median(r.rows[0]["val_acc"] for r in tpe)  # trial 0: the recipe's own values
    tpe_best, rand_best, asha_best = (statistics.median(best(r) for r in arm) for arm in (tpe, rand, asha))
    tpe_epochs, asha_epochs = (statistics.median(epochs(r) for r in arm) for arm in (tpe, asha))
    print(f"\ntune: fashion_mnist recipe, {args.images} training images, imgtrain_cnn_small, 4 parameters, "
          f"{args.trials} trials of {args.epochs} epochs, median of {args.seeds} seed(s)")
    print(f"{'arm':<36s}{'best val acc':>14s}{'epochs spent':>14s}{'ratio':>8s}")
    print(f"{'(a) recipe values (trial 0)':<36s}{defaults:>14.4f}{args.epochs:>14d}")
    print(f"{'(a) best trial, TPE':<36s}{tpe_best:>14.4f}{tpe_epochs:>14.0f}{tpe_best - defaults:>+8.4f}")
    print(f"{'(b) random search':<36s}{rand_best:>14.4f}{statistics.median(epochs(r) for r in rand):>14.0f}")
    print(f"{'(b) TPE':<36s}{tpe_best:>14.4f}{tpe_epochs:>14.0f}{tpe_best - rand_best:>+8.4f}")
    print(f"{'(c) no pruning (TPE)':<36s}{tpe_best:>14.4f}{tpe_epochs:>14.0f}{1.0:>8.3f}")
    print(f"{'(c) ASHA pruning (TPE)':<36s}{asha_best:>14.4f}{asha_epochs:>14.0f}{asha_epochs / tpe_epochs:>8.3f}")
    pruning_ok = asha_epochs <= 0.6 * tpe_epochs and asha_best >= tpe_best - 0.003
    print(f"goal: pruning epochs <= 0.6x and best acc within 0.3 points -> {'met' if pruning_ok else 'NOT met'} "
          f"({asha_epochs / tpe_epochs:.2f}x, {100 * (asha_best - tpe_best):+.2f} points)")
    print(f"goal: TPE >= random search -> {'met' if tpe_best >= rand_best else 'NOT met'} "
          f"({100 * (tpe_best - rand_best):+.2f} points)")


if __name__ == "__main__":
    main()
