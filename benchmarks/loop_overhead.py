"""How much does the Trainer cost over a plain hand-written PyTorch loop?

Both train the same model (same init), on the same in-memory Fashion-MNIST images (a
fixed subset, already float and normalised, so the input pipeline costs the same and
little), with the same optimizer, one-cycle schedule and batch order, for the same
epochs. The plain loop does what a person writes by hand: forward, loss, backward,
step, zero_grad, scheduler step, and sums loss and correct predictions for its log.
The Trainer runs with its default trackers (train.log, history.csv, events.jsonl,
plots redrawn every epoch, progress lines), so the number is what a user pays.

Runs alternate (plain, trainer, plain, trainer, ...) and each side reports its median
images/s, so a noisy neighbour hits both alike.

    python benchmarks/loop_overhead.py [--epochs 3] [--images 20000] [--repeats 3] [--model imgtrain_cnn_tiny]

About 3.5 minutes on 2 CPU cores. Runs of a few seconds would mostly measure the fixed
cost of a run (the final plots, summary and checkpoints, ~0.5 s), not the loop.

Goal (issue 2): Trainer images/s at 0.97 or more of the plain loop's.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from imgtrain.config import load_recipe
from imgtrain.data import build_splits
from imgtrain.engine.events import HookList
from imgtrain.engine.loop import Trainer, TrainParts
from imgtrain.engine.optim import build_optimizer, build_scheduler
from imgtrain.engine.state import EpochPlan
from imgtrain.models import create_model
from imgtrain.tracking import build_trackers


def load_images(count: int):
    recipe = load_recipe(None, ["data.source=fashion-mnist", "data.val_fraction=0.0"])
    train = build_splits(recipe.data).train
    images = torch.stack([train[i][0] for i in range(count)]).float().div_(255)
    images = (images - images.mean()) / images.std()
    return images, train.targets[:count].clone()


def make_loader(images, targets, batch_size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(images, targets), batch_size=batch_size, shuffle=True, generator=generator)
    return loader, generator


def plain_setup(recipe, images, targets):
    """What a hand-written loop builds: the model (seed 0), loader and its generator, optimizer, schedule."""
    torch.manual_seed(0)
    model = create_model(recipe.model, num_classes=10, in_chans=1)
    loader, generator = make_loader(images, targets, recipe.data.batch_size, 0)
    optimizer = build_optimizer(model, recipe.optim)
    scheduler = build_scheduler(optimizer, recipe.schedule, recipe.optim.lr,
                                total_steps=len(loader) * recipe.train.epochs, steps_per_epoch=len(loader))
    return model, loader, generator, optimizer, scheduler


def run_plain(recipe, images, targets) -> float:
    model, loader, generator, optimizer, scheduler = plain_setup(recipe, images, targets)
    started = time.perf_counter()
    seen = 0
    for epoch in range(recipe.train.epochs):
        generator.manual_seed(epoch)
        model.train()
        loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
        for inputs, labels in loader:
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss_sum += loss.detach() * labels.shape[0]
            correct += (outputs.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
        print(f"  plain epoch {epoch + 1}: loss {loss_sum.item() / len(images):.4f}", file=sys.stderr)
    return seen / (time.perf_counter() - started)


def run_trainer(recipe, images, targets) -> float:
    torch.manual_seed(0)
    model = create_model(recipe.model, num_classes=10, in_chans=1)
    loader, generator = make_loader(images, targets, recipe.data.batch_size, 0)
    with tempfile.TemporaryDirectory() as run_dir:
        hooks = HookList(trackers=build_trackers(recipe, run_dir, console_stream=io.StringIO()))
        parts = TrainParts(model=model, loss_fn=torch.nn.CrossEntropyLoss(), loader_for=lambda size: loader,
                           plans=[EpochPlan(0, 28, recipe.data.batch_size)] * recipe.train.epochs,
                           classes=[str(i) for i in range(10)], train_generator=generator)
        trainer = Trainer(recipe, parts, hooks, Path(run_dir))
        started = time.perf_counter()
        state = trainer.fit()
        elapsed = time.perf_counter() - started
    return sum(len(images) for _ in state.history) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="imgtrain_cnn_tiny")
    args = parser.parse_args()
    torch.set_num_threads(2)
    # the trainer's seed makes the generator reseed per epoch the same way the plain loop does
    recipe = load_recipe(None, [f"train.epochs={args.epochs}", f"data.batch_size={args.batch_size}",
                                f"model.name={args.model}", "output.progress=log", "train.seed=0"])
    images, targets = load_images(args.images)
    plain, trainer = [], []
    for repeat in range(args.repeats):
        plain.append(run_plain(recipe, images, targets))
        trainer.append(run_trainer(recipe, images, targets))
        print(f"repeat {repeat + 1}: plain {plain[-1]:.0f} img/s, trainer {trainer[-1]:.0f} img/s", file=sys.stderr)
    p, t = statistics.median(plain), statistics.median(trainer)
    print(f"\nloop overhead: {args.model}, {args.images} Fashion-MNIST images, batch {args.batch_size}, "
          f"{args.epochs} epochs, {args.repeats} alternating repeats, {torch.get_num_threads()} threads")
    print(f"{'loop':<28s}{'images/s (median)':>20s}{'ratio':>8s}")
    print(f"{'plain PyTorch loop':<28s}{p:>20.0f}{1.0:>8.3f}")
    print(f"{'imgtrain Trainer':<28s}{t:>20.0f}{t / p:>8.3f}")
    print(f"goal: ratio >= 0.97 -> {'met' if t / p >= 0.97 else 'NOT met'}")


if __name__ == "__main__":
    main()
