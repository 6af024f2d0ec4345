"""Do the class-imbalance tools help on a long-tailed training set?

Training set: Fashion-MNIST made long-tailed. Class i keeps round(5000 * 100^(-i/9))
images (5000, 2997, ..., 83, 50: the largest class 100x the smallest, 12,408 in all),
chosen by a seeded shuffle of each class's images, written as IDX files to a temporary
folder and read back through the real `fashion-mnist` source (`data.root`). Evaluation:
the balanced 10,000-image test set (1,000 per class), on the final weights (no validation
split: a long-tailed one would pick checkpoints for the head classes).

Every run uses the same recipe, model, seed and number of steps; only the imbalance keys
differ. Post-hoc adjustment needs no training of its own: it re-scores the plain
cross-entropy model's test logits, minus tau * log(train prior) (imgtrain.losses
`posthoc_adjust_logits`): the same offset `imbalance.posthoc_adjust: true` applies in a run.

    python benchmarks/imbalance.py [--epochs 6] [--model imgtrain_cnn_tiny] [--threads 1]
                                   [--tools ce,inverse,...]   (focal_effective: opt-in)

Six trainings of about 100 s each with the defaults: ~11 minutes on 2 shared CPU cores.

Goal (issue 3): each tool at least 3 points of balanced accuracy above plain cross-entropy.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from imgtrain.api import load_trained, train
from imgtrain.config import load_recipe
from imgtrain.data import build_eval_transform, build_splits
from imgtrain.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FASHION_MNIST_FILES, read_idx
from imgtrain.losses import class_counts, class_prior, posthoc_adjust_logits

LARGEST, RATIO = 5000, 100  # images of class 0; class 0 / class 9

# tool name -> (recipe overrides, post-hoc adjustment of the plain model's logits)
TOOLS = {
    "ce": ([], False),
    "inverse": (["imbalance.class_weights=inverse"], False),
    "effective": (["imbalance.class_weights=effective"], False),
    "focal": (["imbalance.loss=focal"], False),
    "balanced_sampler": (["data.sampler=balanced"], False),
    "logit_adjusted": (["imbalance.loss=logit_adjusted"], False),
    "posthoc": ([], True),
    # Cui et al.'s class-balanced focal loss: focal loss with effective-number weights
    "focal_effective": (["imbalance.loss=focal", "imbalance.class_weights=effective"], False),
}
DEFAULT_TOOLS = ("ce", "inverse", "effective", "focal", "balanced_sampler", "logit_adjusted", "posthoc")
LABELS = {
    "ce": "plain cross-entropy",
    "inverse": "class weights: inverse",
    "effective": "class weights: effective",
    "focal": "focal loss",
    "balanced_sampler": "balanced sampler",
    "logit_adjusted": "logit-adjusted loss",
    "posthoc": "post-hoc adjustment",
    "focal_effective": "focal + effective weights",
}


def long_tailed_counts(num_classes: int = 10) -> list[int]:
    return [round(LARGEST * RATIO ** (-i / (num_classes - 1))) for i in range(num_classes)]


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file of unsigned bytes (the MNIST format read_idx reads)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_long_tailed_copy(folder: Path, seed: int = 0) -> list[int]:
    """Write the long-tailed training set and link the full test set into `folder`."""
    source = Path(FASHION_MNIST_DIR)
    images_name, labels_name = FASHION_MNIST_FILES["train"]
    images = read_idx(source / f"{images_name}.gz")
    labels = read_idx(source / f"{labels_name}.gz")
    rng = np.random.default_rng(seed)
    counts = long_tailed_counts()
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n]
                                   for c, n in enumerate(counts)]))
    write_idx(folder / images_name, images[keep])
    write_idx(folder / labels_name, labels[keep])
    for stem in FASHION_MNIST_FILES["test"]:
        (folder / f"{stem}.gz").symlink_to(source / f"{stem}.gz")
    return counts


def base_overrides(root: Path, args) -> list[str]:
    return [f"data.root={root}", "data.val_fraction=0.0", f"model.name={args.model}",
            f"train.epochs={args.epochs}", f"data.batch_size={args.batch_size}", f"train.seed={args.seed}",
            f"train.threads={args.threads}", "output.progress=off", "output.plots=false",
            "output.save_best=false"]


@torch.no_grad()
def test_logits(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Test-set logits and labels of a run's final weights, and its training labels."""
    loaded = load_trained(run_dir / "checkpoints" / "last.safetensors")
    splits = build_splits(loaded.recipe.data)
    transform = build_eval_transform(loaded.recipe.augment, splits.channels, loaded.img_size, loaded.mean,
                                     loaded.std, splits.native_size)   # as imgtrain.api.train builds it
    test = splits.test.with_transform(transform)
    loader = torch.utils.data.DataLoader(test, batch_size=500)
    logits = torch.cat([loaded.model(images) for images, _ in loader])
    return logits, test.targets, splits.train.targets


def scores(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    predictions = logits.argmax(1)
    recall = torch.stack([(predictions[labels == c] == c).float().mean() for c in range(logits.shape[1])])
    return {"balanced_acc": float(recall.mean()), "acc": float((predictions == labels).float().mean()),
            "tail_recall": float(recall[-3:].mean()), "head_recall": float(recall[:3].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--model", default="imgtrain_cnn_tiny")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    # one thread: on a small shared CPU, two threads of one process contend with each other
    # and with the neighbours (cnn_tiny trains ~2x faster here with 1 thread than with 2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (train.threads)")
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS),
                        help=f"comma-separated, of {', '.join(TOOLS)}")
    args = parser.parse_args()
    tools = [t.strip() for t in args.tools.split(",")]
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        parser.error(f"unknown tool(s) {unknown}; choose from {', '.join(TOOLS)}")
    if "ce" not in tools:
        tools.insert(0, "ce")   # the baseline of every difference

    work = Path(tempfile.mkdtemp(prefix="imgtrain-imbalance-"))
    try:
        data = work / "fashion-mnist-lt"
        data.mkdir()
        counts = make_long_tailed_copy(data)
        print(f"long-tailed Fashion-MNIST train: {sum(counts)} images, per class {counts}", file=sys.stderr)
        results: dict[str, dict] = {}
        plain_logits = plain_labels = prior = None
        for tool in tools:
            overrides, posthoc = TOOLS[tool]
            started = time.perf_counter()
            if posthoc:
                if plain_logits is None:
                    continue
                logits, labels = posthoc_adjust_logits(plain_logits, prior, tau=1.0), plain_labels
                seconds = 0.0
            else:
                recipe = load_recipe("fashion_mnist", base_overrides(data, args) + overrides)
                run = train(recipe, run_dir=work / "runs" / tool, console=io.StringIO()).run_dir
                seconds = time.perf_counter() - started
                logits, labels, train_targets = test_logits(run)
                if tool == "ce":
                    plain_logits, plain_labels = logits, labels
                    prior = class_prior(class_counts(train_targets, len(FASHION_MNIST_CLASSES)))
            results[tool] = dict(scores(logits, labels), seconds=seconds, keys=" ".join(overrides) or
                                 ("imbalance.posthoc_adjust=true" if posthoc else "(defaults)"))
            r = results[tool]
            print(f"  {tool}: balanced acc {r['balanced_acc']:.4f} ({seconds:.0f} s)", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = results["ce"]["balanced_acc"]
    print(f"\nclass imbalance: Fashion-MNIST long-tailed {RATIO}x ({sum(counts)} train images, "
          f"{counts[0]} -> {counts[-1]} per class), balanced 10,000-image test set; {args.model}, "
          f"{args.epochs} epochs, batch {args.batch_size}, seed {args.seed}, {args.threads} thread(s), "
          "recipe fashion_mnist, final weights")
    header = (f"{'tool':<26s}{'balanced acc':>13s}{'vs CE (pts)':>12s}{'acc':>8s}{'head 3':>8s}{'tail 3':>8s}"
              f"{'train s':>9s}  keys")
    print(header)
    for tool, r in results.items():
        diff = 100 * (r["balanced_acc"] - base)
        print(f"{LABELS[tool]:<26s}{r['balanced_acc']:>13.4f}{diff:>+12.1f}{r['acc']:>8.4f}{r['head_recall']:>8.4f}"
              f"{r['tail_recall']:>8.4f}{r['seconds']:>9.0f}  {r['keys']}")
    missed = [LABELS[t] for t, r in results.items() if t != "ce" and 100 * (r["balanced_acc"] - base) < 3.0]
    print("head 3 / tail 3: mean recall of the 3 largest / 3 smallest training classes")
    print(f"goal: each tool >= +3.0 points -> {'met' if not missed else 'NOT met by ' + ', '.join(missed)}")
    print("command: python benchmarks/imbalance.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
