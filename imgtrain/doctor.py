"""`imgtrain doctor RECIPE`: a few seconds of checks, run before training, that catch the bugs which
otherwise cost a whole run (README "Training diagnostics" has the table): data, batch grid, initial
loss, gradients, overfit one batch, learn (a few steps over other batches must carry to the val split).
Mixing and label smoothing are left out: they keep a batch's loss from reaching zero.

    report = run_doctor(load_recipe("quickstart"), output="doctor")
    print(report.table()); report.ok
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imgtrain.api import param_groups, prepare_data
from imgtrain.config import Recipe
from imgtrain.data.loaders import CycledLoader
from imgtrain.data.prepare import seed_everything
from imgtrain.data.sources import build_splits
from imgtrain.engine.device import select_device
from imgtrain.engine.events import Hook, HookList
from imgtrain.engine.loop import Trainer, TrainParts
from imgtrain.engine.state import EpochPlan
from imgtrain.io import dumps_json
from imgtrain.losses import build_train_loss, check_imbalance_recipe
from imgtrain.models import create_model
from imgtrain.models.weights import load_initial_weights
from imgtrain.strategies.base import StrategyContext
from imgtrain.strategies.diagnostics import check_diagnostics, classify_gradients, gradient_norms, missing_gradients
from imgtrain.strategies.transfer import Transfer
from imgtrain.tools.preview import denormalize, draw_grid, label_text

IMBALANCE_FLAG = 10.0      # largest / smallest training class above this is flagged
GRID_LIMIT = 64            # images drawn from the batch
FIND_LR = 0.01             # the lr tried when the recipe says optim.lr: find
LEARN_MIN_IMAGES = 200     # the learn check fails only on a val split at least this large

CAUSE_LR_HIGH = "learning rate too high (optim.lr {lr:g}): the loss diverges; try a tenth of it"
CAUSE_LR_LOW = ("learning rate too low (optim.lr {lr:g}), or layers frozen by mistake (transfer.*): the loss "
                "barely moves; try ten times the lr")
CAUSE_SLOW = ("the loss falls but not far enough: learning rate too low (optim.lr {lr:g}), too few steps "
              "(diagnostics.doctor_steps), or a model too small for the batch")
CAUSE_LABELS = ("the model fits one batch but learns nothing that carries to the val split: images and labels "
                "shuffled apart (a data-loading bug), val labels that mean other classes, or a learning rate far "
                "off (optim.lr {lr:g})")
CAUSE_LOSS_HIGH = ("initial logits far from uniform: inputs not normalised (augment.normalize), a large head "
                   "initialisation, or a loss that sums instead of averaging")
CAUSE_LOSS_LOW = "the labels may leak into the inputs, or the loss does not compare C classes"
CAUSE_NO_GRAD = ("layers outside the forward pass or cut off from the loss (a detach, a no_grad), "
                 "or frozen by mistake (transfer.*)")
CAUSE_VANISHING = ("vanishing gradients: a deep net without normalisation, saturated activations, or a tiny "
                   "initialisation")
CAUSE_BAD_INPUT = "bad inputs: images with nan or inf after the transforms (augment.normalize: given with std 0?)"


@dataclass
class Check:
    name: str
    status: str               # PASS | WARN | FAIL | SKIP
    detail: str
    cause: str = ""           # on FAIL (and WARN): the likely cause
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class DoctorReport:
    recipe: str
    checks: list[Check]
    grid: Path | None
    seconds: float

    @property
    def ok(self) -> bool:
        return all(c.status != "FAIL" for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def table(self) -> str:
        lines = [f"imgtrain doctor: {self.recipe}"]
        for c in self.checks:
            lines.append(f"{c.status:<5} {c.name:<14} {c.detail}")
            if c.cause:
                lines.append(f"{'':<20} likely cause: {c.cause}")
        failed = [c.name for c in self.checks if c.status == "FAIL"]
        lines.append(f"{len(self.checks) - len(failed)} of {len(self.checks)} checks passed"
                     + (f"; failed: {', '.join(failed)}" if failed else "") + f" ({self.seconds:.0f} s)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "ok": self.ok, "grid": str(self.grid) if self.grid else None,
                "seconds": round(self.seconds, 2), "checks": [dataclasses.asdict(c) for c in self.checks]}


# ----------------------------------------------------------------------------- the checks

def class_count_check(splits: Any) -> Check:
    """Images per class and split: an empty training class fails, > 10x imbalance is flagged."""
    classes = list(splits.classes)
    counts = {name: torch.bincount(split.targets, minlength=len(classes)).tolist()
              for name, split in (("train", splits.train), ("val", splits.val), ("test", splits.test))
              if split is not None}
    train = counts["train"]
    values = {"classes": classes, "counts": counts, "channels": splits.channels, "native_size": splits.native_size}
    sizes = " / ".join(f"{name} {sum(c)}" for name, c in counts.items())
    detail = (f"{sizes} images, {len(classes)} classes, {splits.channels} channel(s), {splits.native_size} px; "
              f"train per class {min(train)}..{max(train)}")
    empty_train = [classes[i] for i, n in enumerate(train) if n == 0]
    if empty_train:
        return Check("data", "FAIL", detail + f"; no training images for {', '.join(empty_train)}",
                     "data loading: a class folder or CSV label with no images, or a filter (data.train_subset) "
                     "that dropped it", values)
    empty_eval = [f"{classes[i]} ({name})" for name in ("val", "test") if name in counts
                  for i, n in enumerate(counts[name]) if n == 0]
    ratio = max(train) / min(train)
    values["imbalance"] = ratio
    if ratio > IMBALANCE_FLAG:
        return Check("data", "WARN", detail + f" ({ratio:.0f}x imbalance)",
                     "class imbalance over 10x: consider imbalance.class_weights, imbalance.loss or "
                     "data.sampler: balanced", values)
    if empty_eval:
        return Check("data", "WARN", detail + f"; no images for {', '.join(empty_eval)}",
                     "those classes are never evaluated", values)
    return Check("data", "PASS", detail + f" ({ratio:.1f}x)", values=values)


def initial_loss_check(loss: float, num_classes: int, tolerance: float, pretrained: bool) -> Check:
    """A fresh classifier scores about log(C); a started-from-weights one may score lower."""
    expected = math.log(num_classes)
    detail = f"{loss:.3f} vs log({num_classes}) = {expected:.3f}"
    values = {"loss": loss, "expected": expected}
    if not math.isfinite(loss):
        return Check("initial loss", "FAIL", detail, CAUSE_BAD_INPUT, values)
    if loss > expected * (1 + tolerance):
        return Check("initial loss", "FAIL", detail, CAUSE_LOSS_HIGH, values)
    if loss < expected * (1 - tolerance):
        if pretrained:
            return Check("initial loss", "PASS", detail + " (starts from trained weights: lower is expected)",
                         values=values)
        return Check("initial loss", "FAIL", detail, CAUSE_LOSS_LOW, values)
    return Check("initial loss", "PASS", detail, values=values)


def gradient_check(model: torch.nn.Module, vanishing_below: float, exploding_above: float) -> Check:
    """After one backward: every trainable layer has a gradient, none vanishes or is non-finite."""
    params = list(model.named_parameters())
    frozen = sum(1 for _, p in params if not p.requires_grad)
    missing = missing_gradients(model)
    norms = gradient_norms(model)
    flags = classify_gradients(norms, vanishing_below, exploding_above)
    values = {"layers": len(norms), "frozen_tensors": frozen, "missing": missing, "vanishing": flags.vanishing,
              "nonfinite": flags.nonfinite, "norms": norms}
    frozen_text = f"; {frozen} of {len(params)} parameter tensors frozen (transfer.*)" if frozen else ""
    if not norms:
        return Check("gradients", "FAIL", "no parameter gets a gradient" + frozen_text, CAUSE_NO_GRAD, values)
    if flags.nonfinite:
        return Check("gradients", "FAIL", f"non-finite gradient in {', '.join(flags.nonfinite[:5])}",
                     CAUSE_BAD_INPUT, values)
    if missing:
        return Check("gradients", "FAIL", f"{len(missing)} trainable tensor(s) get no gradient: "
                     f"{', '.join(missing[:5])}" + frozen_text, CAUSE_NO_GRAD, values)
    if flags.vanishing:
        return Check("gradients", "FAIL", f"vanishing (< {vanishing_below:g}) in {', '.join(flags.vanishing[:5])}",
                     CAUSE_VANISHING, values)
    smallest = min(norms, key=norms.__getitem__)
    return Check("gradients", "PASS", f"all {len(norms)} trainable layers get gradients; smallest "
                 f"{norms[smallest]:.2g} ({smallest}), largest {max(norms.values()):.2g}{frozen_text}", values=values)


def overfit_check(curve: list[float], final: float, accuracy: float, threshold: float, lr: float) -> Check:
    """The batch loss must end below `threshold`; the shape of the curve names the cause."""
    start, steps = curve[0], len(curve)
    detail = (f"loss {start:.3f} -> {final:.4g} in {steps} steps (must end < {threshold:g}); "
              f"batch accuracy {accuracy:.0%}")
    values = {"curve": curve, "final": final, "accuracy": accuracy, "lr": lr}
    if math.isfinite(final) and final < threshold:
        return Check("overfit batch", "PASS", detail, values=values)
    if not math.isfinite(final) or not all(math.isfinite(v) for v in curve) or final > start * 1.5:
        return Check("overfit batch", "FAIL", detail, CAUSE_LR_HIGH.format(lr=lr), values)
    if final > start * 0.8:
        return Check("overfit batch", "FAIL", detail, CAUSE_LR_LOW.format(lr=lr), values)
    return Check("overfit batch", "FAIL", detail, CAUSE_SLOW.format(lr=lr), values)


def learn_check(accuracy: float, majority: float, images: int, steps: int, lr: float, overfit_ok: bool = True) -> Check:
    """Val accuracy after a few steps: PASS clearly above always answering the largest class, FAIL no
    better than that on LEARN_MIN_IMAGES val images or more, else WARN (too weak a signal to fail on)."""
    needed = majority + 0.2 * (1 - majority)
    detail = (f"val accuracy {accuracy:.1%} after {steps} steps on {images} val images (passes at {needed:.1%}; "
              f"largest class {majority:.1%})")
    values = {"accuracy": accuracy, "majority": majority, "needed": needed, "images": images}
    if accuracy >= needed:
        return Check("learn", "PASS", detail, values=values)
    if not overfit_ok:
        return Check("learn", "FAIL", detail, "the overfit check failed too: fix its cause first", values)
    noise = 2 * math.sqrt(majority * (1 - majority) / max(images, 1))  # two standard errors of a guess
    if images >= LEARN_MIN_IMAGES and accuracy <= majority + noise:
        return Check("learn", "FAIL", detail, CAUSE_LABELS.format(lr=lr), values)
    return Check("learn", "WARN", detail, "slow to learn, or " + CAUSE_LABELS.format(lr=lr)
                 + "; raise diagnostics.doctor_learn_steps to tell", values)


# ----------------------------------------------------------------------------- running them

def _doctor_recipe(recipe: Recipe) -> tuple:
    """The recipe the checks train with (no mixing or label smoothing, a number for the lr), and its lr."""
    lr = recipe.optim.lr if not isinstance(recipe.optim.lr, str) else FIND_LR
    plain = dataclasses.replace(
        recipe, optim=dataclasses.replace(recipe.optim, lr=lr),
        train=dataclasses.replace(recipe.train, label_smoothing=0.0, grad_accum_steps=1, max_steps_per_epoch=None,
                                  epochs=1),
        mix=dataclasses.replace(recipe.mix, mixup_alpha=None, cutmix_alpha=None))
    return plain, float(lr)


class _Probe(Hook):
    """Reads the real Trainer as doctor runs it: the plain cross-entropy of every step's batch, and the
    gradient check at the first step (gradients unscaled, as the optimizer sees them)."""

    name = "doctor_probe"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.curve: list[float] = []
        self.gradients: Check | None = None

    def after_forward(self, state: Any) -> None:
        self.curve.append(float(F.cross_entropy(state.outputs.detach().float(), state.targets)))

    def before_step(self, state: Any) -> None:
        if self.gradients is None:
            self.gradients = gradient_check(state.model, self.cfg.vanishing_below, self.cfg.exploding_above)


def _train(recipe: Recipe, model: torch.nn.Module, splits: Any, loader: Any, batch_transform: Any,
           schedule: bool) -> _Probe:
    """Train `model` on the real Trainer over one pass of `loader` as the recipe's first epoch would (schedule
    False: the lr held at optim.lr); returns the probe that watched it."""
    if not schedule:
        recipe = dataclasses.replace(recipe, schedule=dataclasses.replace(recipe.schedule, name="constant",
                                                                          warmup_epochs=0.0))
    probe = _Probe(recipe.diagnostics)
    transfer = Transfer()  # layers frozen in the first epoch stay frozen, as in training
    context = StrategyContext(recipe=recipe, classes=list(splits.classes), channels=splits.channels, img_size=0,
                              device=select_device(recipe.train.device), model=model)
    freezing = transfer.build(recipe, context) if transfer.enabled(recipe) else []
    parts = TrainParts(model=model, loss_fn=build_train_loss(recipe, splits.train.targets, len(splits.classes)),
                       loader_for=lambda batch_size: loader, plans=[EpochPlan(0, 0, recipe.data.batch_size)],
                       classes=list(splits.classes), param_groups=param_groups(recipe, model),
                       train_batch_transform=batch_transform)
    Trainer(recipe, parts, HookList(strategies=[*freezing, probe])).fit()
    return probe


@torch.no_grad()
def _accuracy_and_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> tuple:
    model.eval()
    outputs = model(inputs).float()
    model.train()
    return float((outputs.argmax(1) == targets).float().mean()), float(F.cross_entropy(outputs, targets))


def _first_batch(prepared: Any, device: torch.device, seed: int) -> tuple:
    prepared.loaders.train_generator.manual_seed(seed)
    inputs, targets = next(iter(prepared.loaders.train))
    inputs, targets = inputs.to(device), targets.to(device)
    if prepared.train_batch_transform is not None:
        inputs = prepared.train_batch_transform(inputs)
    return inputs.float(), targets


@torch.no_grad()
def _val_accuracy(model: torch.nn.Module, prepared: Any, device: torch.device, limit: int = 2048) -> tuple:
    correct = seen = 0
    model.eval()
    for inputs, targets in prepared.loaders.val:
        inputs, targets = inputs.to(device), targets.to(device)
        if prepared.eval_batch_transform is not None:
            inputs = prepared.eval_batch_transform(inputs)
        correct += int((model(inputs).argmax(1) == targets).sum())
        seen += len(targets)
        if seen >= limit:
            break
    model.train()
    return correct / max(seen, 1), seen


def run_doctor(recipe: Recipe, output: str | Path = "doctor") -> DoctorReport:
    """Run the checks of the module docstring; writes OUTPUT/batch.png and OUTPUT/doctor.json."""
    started = time.perf_counter()
    cfg = recipe.diagnostics
    check_diagnostics(cfg, file=recipe.source_file)
    out = Path(output)
    seed_everything(recipe.train.seed)
    splits = build_splits(recipe.data)
    check_imbalance_recipe(recipe, splits.classes)
    device = select_device(recipe.train.device)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    plain, lr = _doctor_recipe(recipe)
    prepared = prepare_data(plain, splits, device)
    checks = [class_count_check(splits)]
    classes, num_classes = list(splits.classes), len(splits.classes)

    # the batch as the model sees it, and a picture of it
    inputs, targets = _first_batch(prepared, device, recipe.train.seed)
    finite = bool(torch.isfinite(inputs).all())
    stats = f"pixels mean {float(inputs.nan_to_num().mean()):.2f}, std {float(inputs.nan_to_num().std()):.2f}"
    shown = min(len(targets), GRID_LIMIT)
    texts = [label_text(F.one_hot(t, num_classes).float(), classes) for t in targets[:shown].cpu()]
    grid = out / "batch.png"
    draw_grid(denormalize(inputs[:shown].nan_to_num().cpu(), prepared.mean, prepared.std), texts, grid)
    checks.append(Check("batch grid", "PASS" if finite else "FAIL",
                        f"{grid}: {shown} of a {len(targets)}-image training batch at {inputs.shape[-1]} px, "
                        f"labelled; {stats}", "" if finite else CAUSE_BAD_INPUT))

    # one fixed batch, stepped doctor_steps times on the real Trainer: the initial loss and the
    # gradients of the first step, then how far the loss falls
    model = create_model(plain.model, num_classes=num_classes, in_chans=splits.channels)
    load_initial_weights(model, plain.model, num_classes=num_classes, in_chans=splits.channels)
    start_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batch_x, batch_y = inputs[:cfg.doctor_batch_size], targets[:cfg.doctor_batch_size]
    probe = _train(plain, model, splits, [(batch_x, batch_y)] * cfg.doctor_steps, None, schedule=False)
    pretrained = bool(recipe.model.weights or recipe.model.weights_file)
    checks.append(initial_loss_check(probe.curve[0], num_classes, cfg.doctor_init_tolerance, pretrained))
    assert probe.gradients is not None, "set at the first optimizer step (doctor_steps >= 1)"
    checks.append(probe.gradients)
    accuracy, final = _accuracy_and_loss(model, batch_x, batch_y)
    checks.append(overfit_check(probe.curve, final, accuracy, cfg.doctor_loss_below, lr))

    # from the same start: a few steps over different batches must carry to the val split
    if cfg.doctor_learn_steps and prepared.loaders.val is not None:
        model.load_state_dict(start_weights)
        # the recipe's schedule over these steps: it ends at a low lr, so the val score is a settled one
        batches = CycledLoader(prepared.loaders.train, cfg.doctor_learn_steps)
        _train(plain, model, splits, batches, prepared.train_batch_transform, schedule=True)
        steps = cfg.doctor_learn_steps
        assert splits.val is not None, "a val loader comes from a val split"
        val_targets = splits.val.targets
        majority = float(torch.bincount(val_targets, minlength=num_classes).max()) / max(len(val_targets), 1)
        accuracy, images = _val_accuracy(model, prepared, device)
        checks.append(learn_check(accuracy, majority, images, steps, lr, overfit_ok=checks[-1].status == "PASS"))
    else:
        why = "no val split" if prepared.loaders.val is None else "diagnostics.doctor_learn_steps is 0"
        checks.append(Check("learn", "SKIP", why))

    source = Path(recipe.source_file).stem if recipe.source_file else "defaults"
    report = DoctorReport(recipe=f"{source} ({recipe.data.source}, {recipe.model.name}, {num_classes} classes)",
                          checks=checks, grid=grid, seconds=time.perf_counter() - started)
    (out / "doctor.json").write_text(dumps_json(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return report


__all__ = ["Check", "DoctorReport", "class_count_check", "gradient_check", "initial_loss_check", "learn_check",
           "overfit_check", "run_doctor"]
