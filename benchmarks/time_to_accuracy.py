"""Time to accuracy on Fashion-MNIST: how soon does each way of training reach 92% and 93% test accuracy?

    python benchmarks/time_to_accuracy.py [--arms recipe,plain,fast] [--budgets 5m,10m,15m] [--images 60000]

Arms, run one after the other on this machine (Debian's dataset-fashion-mnist, the 10,000 test images):

    recipe       imgtrain train fashion_mnist (12 epochs, as shipped)
    plain        a hand-written PyTorch loop with the same network, optimizer and one-cycle schedule
                 (benchmarks/loop_overhead.py's), on the images in memory, testing after every epoch
    fast B       imgtrain train fashion_mnist_fast --budget B, for each budget B (configs/fashion_mnist_fast.yaml)

Wall time counts from the moment the command starts (imports, data loading, the test pass included). For
the imgtrain arms the time to a target is when the first epoch's validation accuracy reached it (from
events.jsonl, counted from the launch) and the final test accuracy says whether the model holds it; the
plain loop tests every epoch. Goals (issue 16): 92% test in at most 5 minutes, 93% in at most 10, and the
best test accuracy with a 15-minute budget (target 94%).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

FASHION = Path("/usr/share/datasets/fashion-mnist")
TARGETS = (0.92, 0.93, 0.94)


def imgtrain_arm(args: argparse.Namespace, root: Path, name: str, command: list[str]) -> dict:
    """Run `imgtrain train ...` as a user would; the time of each epoch's end counted from the launch."""
    run_dir = root / name.replace(" ", "_")
    overrides = [f"data.root={args.data}", "output.progress=off"]
    if args.images < 60000:
        overrides.append(f"data.train_subset={args.images}")
    launched = time.time()
    done = subprocess.run([sys.executable, "-m", "imgtrain", "train", *command, *overrides, "--run-dir", str(run_dir)],
                          capture_output=True, text=True)
    wall = time.time() - launched
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = []
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "epoch_end" and "val_acc" in event:
            curve.append((datetime.fromisoformat(event["time"]).timestamp() - launched, event["val_acc"]))
    print(f"  {name}: test {summary.get('test_acc', 0):.4f}, {wall:.0f} s", file=sys.stderr, flush=True)
    return {"name": name, "wall": wall, "test": summary.get("test_acc"), "curve": curve, "kind": "val",
            "epochs": summary.get("epochs_run")}


def plain_arm(args: argparse.Namespace) -> dict:
    """The hand-written loop (benchmarks/loop_overhead.py's) on the fashion_mnist recipe's network and
    optimizer, its test accuracy measured after every epoch (the time counted)."""
    launched = time.time()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loop_overhead import plain_setup

    from imgtrain.config import load_recipe
    from imgtrain.data import build_splits

    recipe = load_recipe("fashion_mnist", [f"data.root={args.data}", "data.val_fraction=0.0"])
    splits = build_splits(recipe.data)

    def tensors(split, count):
        images = torch.stack([split[i][0] for i in range(count)]).float().div_(255)
        return images, split.targets[:count].clone()

    images, targets = tensors(splits.train, min(args.images, len(splits.train)))
    test_images, test_targets = tensors(splits.test, len(splits.test))
    mean, std = images.mean(), images.std()
    images, test_images = (images - mean) / std, (test_images - mean) / std
    model, loader, generator, optimizer, scheduler = plain_setup(recipe, images, targets)
    curve, test = [], 0.0
    for epoch in range(recipe.train.epochs):
        generator.manual_seed(epoch)
        model.train()
        for inputs, labels in loader:
            loss = F.cross_entropy(model(inputs), labels, label_smoothing=recipe.train.label_smoothing)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(test_images[i:i + 1000]).argmax(1) == test_targets[i:i + 1000]).sum())
                          for i in range(0, len(test_images), 1000))
        test = correct / len(test_images)
        curve.append((time.time() - launched, test))
        print(f"  plain epoch {epoch + 1}: test {test:.4f} at {curve[-1][0]:.0f} s", file=sys.stderr, flush=True)
    return {"name": "plain loop (same network)", "wall": time.time() - launched, "test": test, "curve": curve,
            "kind": "test", "epochs": recipe.train.epochs}


def reached(arm: dict, target: float) -> str:
    seconds = next((s for s, acc in arm["curve"] if acc >= target), None)
    return "-" if seconds is None else f"{seconds:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="recipe,plain,fast", help="which arms: recipe, plain, fast")
    parser.add_argument("--budgets", default="5m,10m,15m", help="train.budget of each fast arm")
    parser.add_argument("--images", type=int, default=60000, help="training images (a stratified subset)")
    parser.add_argument("--data", type=Path, default=FASHION, help="folder with the Fashion-MNIST IDX files")
    args = parser.parse_args()
    if not (args.data / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"needs the Fashion-MNIST IDX files in {args.data} (apt-get install -y dataset-fashion-mnist)")
    arms = [a.strip() for a in args.arms.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        if "recipe" in arms:
            results.append(imgtrain_arm(args, Path(tmp), "fashion_mnist recipe", ["fashion_mnist"]))
        if "plain" in arms:
            results.append(plain_arm(args))
        if "fast" in arms:
            for budget in args.budgets.split(","):
                results.append(imgtrain_arm(args, Path(tmp), f"fashion_mnist_fast --budget {budget}",
                                            ["fashion_mnist_fast", "--budget", budget]))
    print(f"\ntime to accuracy: Fashion-MNIST, {args.images} training images, 10,000 test images; seconds from "
          "the launch")
    header = "".join(f"{'to ' + format(t, '.0%'):>10s}" for t in TARGETS)
    print(f"{'arm':<36s}{'wall s':>8s}{'test acc':>10s}{header}  curve  {'wall vs recipe':>14s}")
    base = next((r["wall"] for r in results if r["name"] == "fashion_mnist recipe"), None)
    for r in results:
        ratio = f"{r['wall'] / base:>14.2f}" if base else f"{'-':>14s}"
        cells = "".join(f"{reached(r, t):>10s}" for t in TARGETS)
        print(f"{r['name']:<36s}{r['wall']:>8.0f}{r['test']:>10.4f}{cells}  {r['kind']:<5s}  {ratio}")
    print("'to X': the first epoch end whose accuracy (val for imgtrain arms, test for the plain loop) reached X")


if __name__ == "__main__":
    main()
