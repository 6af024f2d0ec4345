"""The classic strategies side by side on Fashion-MNIST, and whether TTA and ensembling pay.

Per seed, with the CLI exactly as a user runs it (Debian's dataset-fashion-mnist, the 10,000 test images):

    standard      imgtrain train fashion_mnist                       (imgtrain_cnn_small)
    finetune      imgtrain finetune STANDARD fashion_mnist_finetune  (from the standard run's best weights)
    progressive   imgtrain train progressive                          (16, 22, 28 px stages)
    + flip TTA    imgtrain evaluate STANDARD --tta                    (hflip: the recipe trains with flips)
    resnet10t, imgtrain_cnn_tiny: the fashion_mnist recipe with model.name=...
    ensemble      imgtrain ensemble STANDARD RESNET10T CNN_TINY --save DIR; imgtrain evaluate DIR
                  (three different architectures, soft vote; and again with --fit-weights val)

It prints `imgtrain compare` of the first seed's runs (with --target, the validation accuracy to reach),
then every row's test accuracy and test loss over the seeds (mean, sample standard deviation, min..max),
and per seed what flip TTA adds to the standard run and what the ensemble adds to its best member.

    python benchmarks/strategies.py [--images 60000] [--epochs 12] [--seeds 3] [--target 0.9] [--out DIR]

--images takes a stratified subset of the 60,000 training images (validation: 10% of them); --epochs
replaces the recipes' 12 (progressive keeps three equal stages; finetune runs a third of them, at least 2).
With --out DIR the runs are kept there and running the same command again skips what is already done.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

FASHION = Path("/usr/share/datasets/fashion-mnist")
MEMBERS = ("standard", "resnet10t", "cnn_tiny")  # the ensemble: three different architectures


def imgtrain(*args: str) -> None:
    command = [sys.executable, "-m", "imgtrain", *args]
    print("$ imgtrain " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")


def common(args: argparse.Namespace, seed: int) -> list[str]:
    overrides = [f"data.root={args.data}", f"train.seed={seed}", "output.progress=off", "output.report=false"]
    if args.images < 60000:
        overrides.append(f"data.train_subset={args.images}")
    if args.threads:
        overrides.append(f"train.threads={args.threads}")
    return overrides


def run_seed(args: argparse.Namespace, folder: Path, seed: int) -> None:
    """Train and evaluate every row of one seed into `folder` (what exists already is kept)."""
    base, epochs = common(args, seed), [f"train.epochs={args.epochs}"]
    stage = args.epochs // 3
    stages = (f"progressive.stages=[{{img_size: 16, epochs: {stage}}}, {{img_size: 22, epochs: {stage}}}, "
              f"{{img_size: 28, epochs: {args.epochs - 2 * stage}}}]")
    trainings = {
        "standard": ["train", "fashion_mnist", *base, *epochs],
        "finetune": ["finetune", str(folder / "standard"), "fashion_mnist_finetune", *base,
                     f"train.epochs={max(2, args.epochs // 3)}"],
        "progressive": ["train", "progressive", *base, *epochs, stages],
        "resnet10t": ["train", "fashion_mnist", *base, *epochs, "model.name=resnet10t"],
        "cnn_tiny": ["train", "fashion_mnist", *base, *epochs, "model.name=imgtrain_cnn_tiny"],
    }
    for name, command in trainings.items():
        if not (folder / name / "summary.json").is_file():
            imgtrain(*command, "--run-dir", str(folder / name), "--overwrite")
    if not (folder / "standard" / "evaluation" / "test" / "metrics.json").is_file():
        imgtrain("evaluate", str(folder / "standard"), "--tta", "hflip")
    for name, how in (("ensemble", []), ("ensemble_fit", ["--fit-weights", "val"])):
        if not (folder / name / "evaluation" / "test" / "metrics.json").is_file():
            imgtrain("ensemble", *(str(folder / m) for m in MEMBERS), *how, "--save", str(folder / name), "--overwrite")
            imgtrain("evaluate", str(folder / name))


def test_numbers(folder: Path) -> dict[str, tuple[float, float]]:
    """Row -> (test accuracy, test loss) of one seed."""
    numbers = {}
    for name in ("standard", "finetune", "progressive", "resnet10t", "cnn_tiny"):
        summary = json.loads((folder / name / "summary.json").read_text())
        numbers[name] = (summary["test_acc"], summary["test_loss"])
    tta = json.loads((folder / "standard" / "evaluation" / "test" / "metrics.json").read_text())
    numbers["standard + flip TTA"] = (tta["acc"], tta["loss"])
    for name, row in (("ensemble", "ensemble (3 architectures)"), ("ensemble_fit", "ensemble, weights fit on val")):
        ensemble = json.loads((folder / name / "evaluation" / "test" / "metrics.json").read_text())
        numbers[row] = (ensemble["acc"], ensemble["loss"])
    return numbers


def spread(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}  ({min(values):.4f}..{max(values):.4f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60000, help="training images (stratified subset)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.9, help="validation accuracy for compare's columns")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    parser.add_argument("--data", type=Path, default=FASHION, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--out", type=Path, help="keep the runs here; the same command continues them")
    args = parser.parse_args()
    if not (args.data / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"needs the Fashion-MNIST IDX files in {args.data} (apt-get install -y dataset-fashion-mnist)")
    if args.epochs < 3:
        sys.exit("--epochs: at least 3 (progressive resizing has three stages)")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out.resolve() if args.out else Path(tmp)
        for seed in range(args.seeds):
            run_seed(args, root / f"seed{seed}", seed)
        first = root / "seed0"
        rows = [first / "standard", first / "finetune", first / "progressive", first / "resnet10t",
                first / "cnn_tiny", first / "ensemble", first / "ensemble_fit"]
        print(f"\nstrategies: Fashion-MNIST, {args.images} training images, {args.epochs} epochs, seed 0 "
              f"(imgtrain compare ... --target {args.target}):\n", flush=True)
        subprocess.run([sys.executable, "-m", "imgtrain", "compare", *map(str, rows), "--target", str(args.target),
                        "--output", str(root / "compare.md"), "--output", str(root / "compare.html")], check=True)
        seeds = [test_numbers(root / f"seed{seed}") for seed in range(args.seeds)]
    print(f"\ntest accuracy and test loss over {args.seeds} seeds (10,000 test images): mean ± sd (min..max)")
    print(f"{'row':<28s}{'test accuracy':>38s}   {'test loss':>36s}")
    for name in seeds[0]:
        print(f"{name:<28s}{spread([s[name][0] for s in seeds]):>38s}   {spread([s[name][1] for s in seeds]):>36s}")
    tta = [s["standard + flip TTA"][0] - s["standard"][0] for s in seeds]
    print(f"\nflip TTA - standard: accuracy points {', '.join(f'{100 * d:+.2f}' for d in tta)} (helped in "
          f"{sum(d > 0 for d in tta)} of {len(tta)} seeds)")
    for row in ("ensemble (3 architectures)", "ensemble, weights fit on val"):
        gain = [s[row][0] - max(s[m][0] for m in MEMBERS) for s in seeds]
        loss = [s[row][1] - min(s[m][1] for m in MEMBERS) for s in seeds]
        print(f"{row} - best member: accuracy points {', '.join(f'{100 * d:+.2f}' for d in gain)} (above it "
              f"in {sum(d > 0 for d in gain)} of {len(gain)} seeds); test loss {', '.join(f'{d:+.4f}' for d in loss)}")

if __name__ == "__main__":
    main()
