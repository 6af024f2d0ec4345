"""Training diagnostics: per-layer gradient norms, and a guard against non-finite losses.

`imgtrain doctor` checks a run before training; during it two hooks watch (README, "Training
diagnostics"): `GradientMonitorHook` reads every layer's gradient norm every N optimizer steps, at
before_step, in one device sync, and warns once per vanishing or exploding layer (under fp16, inf
gradients are the GradScaler's overflow: recorded, not warned). `NonFiniteGuardHook` checks each
batch's loss (never the gradients, which are the GradScaler's business under fp16) at after_backward,
and stops the run with `NonFiniteLossError` or skips the step; `nonfinite_check_every: N` trades one
device sync per batch for one per N batches.

    norms = gradient_norms(model)                     # {"stem.0": 0.12, "stages.0.0.0": 0.31, ...}
    flags = classify_gradients(norms, vanishing_below=1e-7, exploding_above=100.0)
    first_nonfinite_gradient(model)                   # "stem.0.weight" or None
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from imgtrain.config import RecipeError
from imgtrain.engine.distributed import agree_any
from imgtrain.engine.events import Hook
from imgtrain.strategies.base import Strategy, StrategyContext

VANISHING_BELOW = 1e-7     # default threshold of a vanishing layer's gradient norm
LIKELY_CAUSES = ("the learning rate is too high (lower optim.lr, add schedule.warmup_epochs or set "
                 "train.clip_grad_norm), fp16 overflow (train.amp=bf16 or off), or bad inputs or labels "
                 "(an image of NaNs or infs, a label outside the classes)")


def layer_of(parameter_name: str) -> str:
    """The layer (module path) a parameter belongs to: "stem.0.weight" -> "stem.0"."""
    return parameter_name.rsplit(".", 1)[0] if "." in parameter_name else parameter_name


def _gradients(model: torch.nn.Module) -> list[tuple]:
    return [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]


def gradient_norms(model: torch.nn.Module, by: str = "layer") -> dict[str, float]:
    """L2 norm of the current gradients per layer (a module's weight and bias together) or per
    parameter (`by="parameter"`), in the model's order, in one device sync; no gradient, no entry."""
    if by not in ("layer", "parameter"):
        raise ValueError(f"by must be 'layer' or 'parameter', got {by!r}")
    grads = _gradients(model)
    if not grads:
        return {}
    keys = [layer_of(name) if by == "layer" else name for name, _ in grads]
    index = {key: i for i, key in enumerate(dict.fromkeys(keys))}  # first-seen order
    device = grads[0][1].device
    # squared norm per tensor, summed per layer on the device; only the final list crosses over
    squares = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32).to(device) ** 2
                           for _, g in grads])
    per_key = torch.zeros(len(index), device=device).index_add_(
        0, torch.tensor([index[k] for k in keys], device=device), squares)
    return dict(zip(index, per_key.sqrt().tolist()))


def total_norm(norms: dict[str, float]) -> float:
    """The global gradient norm from per-layer (or per-parameter) norms."""
    return math.sqrt(sum(v * v for v in norms.values()))


@dataclass
class GradientFlags:
    """Layers whose gradient norm is out of bounds."""
    vanishing: list[str] = field(default_factory=list)   # norm < vanishing_below
    exploding: list[str] = field(default_factory=list)   # norm > exploding_above (inf included)
    nonfinite: list[str] = field(default_factory=list)   # nan or inf


def classify_gradients(norms: dict[str, float], vanishing_below: float = VANISHING_BELOW,
                       exploding_above: float = 100.0) -> GradientFlags:
    """Sort layers into vanishing (< vanishing_below), exploding (> exploding_above) and non-finite."""
    if vanishing_below < 0 or exploding_above <= 0 or vanishing_below >= exploding_above:
        raise ValueError(f"need 0 <= vanishing_below < exploding_above, got {vanishing_below} and {exploding_above}")
    flags = GradientFlags()
    for name, value in norms.items():
        if not math.isfinite(value):
            flags.nonfinite.append(name)
        if value < vanishing_below:
            flags.vanishing.append(name)
        elif value > exploding_above:
            flags.exploding.append(name)
    return flags


def first_nonfinite_gradient(model: torch.nn.Module) -> str | None:
    """Name of the first parameter (in the model's order) whose gradient holds a nan or an inf."""
    grads = _gradients(model)
    if not grads:
        return None
    device = grads[0][1].device
    finite = torch.stack([torch.isfinite(g).all().to(device) for _, g in grads]).tolist()  # one sync
    return next((name for (name, _), ok in zip(grads, finite) if not ok), None)


def missing_gradients(model: torch.nn.Module) -> list[str]:
    """Trainable parameters that got no gradient from the last backward (unused or detached)."""
    return [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


def check_diagnostics(cfg: Any, file: str | None = None) -> None:
    """Cross-key checks of the diagnostics section (single keys are checked by config.py)."""
    if cfg.vanishing_below >= cfg.exploding_above:
        raise RecipeError(f"must be below diagnostics.exploding_above ({cfg.exploding_above}), got "
                          f"{cfg.vanishing_below}", file=file, key="diagnostics.vanishing_below")
    if cfg.nonfinite == "skip" and cfg.nonfinite_check_every != 1:
        raise RecipeError(f"nonfinite: skip must see every batch's loss before its optimizer step; set "
                          f"diagnostics.nonfinite_check_every to 1 (got {cfg.nonfinite_check_every}), or use "
                          "nonfinite: stop", file=file, key="diagnostics.nonfinite_check_every")


class NonFiniteLossError(RuntimeError):
    """Training stopped on a nan/inf loss; the message says where, why, and what is saved."""


def _warn(message: str) -> None:
    print(f"imgtrain: warning: {message}", file=sys.stderr, flush=True)


class GradientMonitorHook(Hook):
    """Every `every` optimizer steps: per-layer gradient norms, a history summary, one warning per bad layer."""

    name = "gradient_monitor"

    def __init__(self, every: int, vanishing_below: float = VANISHING_BELOW, exploding_above: float = 100.0):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.vanishing_below, self.exploding_above = every, vanishing_below, exploding_above
        self.warned: dict[str, str] = {}      # layer -> "vanishing" / "exploding", each warned once
        self.readings: list[dict[str, Any]] = []  # this epoch's

    def epoch_start(self, state: Any) -> None:
        if not state.resumed_batches:  # a mid-epoch resume keeps the readings its state restored
            self.readings = []

    def before_step(self, state: Any) -> None:
        # state.step counts the steps taken: this is step state.step + 1, read at 1, 1 + N, ...
        if state.step % self.every or state.skip_step:
            return  # a skipped step's gradients were zeroed by the guard: nothing to read
        norms = gradient_norms(state.model)
        if not norms:
            return
        reading: dict[str, Any] = {"step": state.step + 1, "total": total_norm(norms), "layers": norms}
        if state.scaler is not None and not math.isfinite(reading["total"]):
            reading["overflow"] = True  # fp16: the GradScaler skips this step and lowers its scale
        else:
            flags = classify_gradients(norms, self.vanishing_below, self.exploding_above)
            reading["vanishing"], reading["exploding"] = flags.vanishing, flags.exploding
            for kind, names in (("vanishing", flags.vanishing), ("exploding", flags.exploding)):
                for layer in names:
                    self._warn_once(state, layer, kind, norms[layer])
        self.readings.append(reading)
        state.epoch_details["grad_norms"] = self.readings  # the events log writes it with epoch_end

    def _warn_once(self, state: Any, layer: str, kind: str, value: float) -> None:
        if self.warned.get(layer) == kind:
            return
        self.warned[layer] = kind
        if kind == "vanishing":
            message = (f"gradient monitor: layer {layer} is vanishing (gradient norm {value:.3g} < "
                       f"{self.vanishing_below:g}) at step {state.step + 1}, epoch {state.epoch + 1}: it barely "
                       "learns; look for dead ReLUs, a layer cut off from the loss, or a deep net without "
                       "normalisation")
        else:
            message = (f"gradient monitor: layer {layer} is exploding (gradient norm {value:.3g} > "
                       f"{self.exploding_above:g}) at step {state.step + 1}, epoch {state.epoch + 1}: lower "
                       "optim.lr, add warmup (schedule.warmup_epochs) or clip (train.clip_grad_norm)")
        _warn(message)
        state.note(message)

    def eval_end(self, state: Any) -> None:
        # before the loop turns epoch_metrics into the history row: the summary lands in history.csv
        usable = [r for r in self.readings if not r.get("overflow")]
        if not usable:
            return
        largest = max(usable, key=lambda r: max(r["layers"].values()))
        layer = max(largest["layers"], key=largest["layers"].get)
        state.epoch_metrics.update({
            "grad_norm_total": sum(r["total"] for r in usable) / len(usable),
            "grad_norm_max": largest["layers"][layer],
            "grad_norm_max_layer": layer,
            "grad_vanishing_layers": len({n for r in usable for n in r["vanishing"]}),
            "grad_exploding_layers": len({n for r in usable for n in r["exploding"]}),
        })

    def state_dict(self) -> dict[str, Any]:
        # the layers already warned about, so a resumed run does not repeat itself, and the epoch's
        # readings so far, for a state saved inside an epoch
        return {"warned": dict(self.warned), "readings": list(self.readings)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.warned = dict(state.get("warned", {}))
        self.readings = list(state.get("readings", []))


class NonFiniteGuardHook(Hook):
    """Stops the run (or skips the step) when a batch's loss is nan or inf."""

    name = "nonfinite_guard"

    def __init__(self, mode: str = "stop", check_every: int = 1, max_skipped_steps: int = 10):
        if mode not in ("stop", "skip"):
            raise ValueError(f"mode must be 'stop' or 'skip', got {mode!r}")
        if check_every < 1 or max_skipped_steps < 0:
            raise ValueError("check_every must be >= 1 and max_skipped_steps >= 0")
        if mode == "skip" and check_every != 1:
            raise ValueError("skip mode checks every batch (check_every=1)")
        self.mode, self.check_every, self.max_skipped_steps = mode, check_every, max_skipped_steps
        self.skipped = 0                      # optimizer steps skipped in the run (resumed)
        self._group_bad = False               # this accumulation group had a bad batch
        self._skipped_epoch: list[dict[str, Any]] = []
        self._losses: torch.Tensor | None = None  # deferred checks: this window's losses, on the device
        self._pending = 0
        self._window: list[tuple] = []        # (batch index, optimizer step) of each pending loss

    def epoch_start(self, state: Any) -> None:
        if not state.resumed_batches:  # a mid-epoch resume keeps what its state restored
            self._group_bad, self._skipped_epoch, self._pending = False, [], 0

    def after_backward(self, state: Any) -> None:
        loss = state.loss.detach()
        if self.check_every == 1:
            # one device sync per batch: the price of catching the batch itself
            # several processes: a bad batch on any rank counts on every rank, so all skip (or stop) together
            value = float(loss.float().mean())
            (bad,) = agree_any(not math.isfinite(value))
            if bad:  # the value another rank found is not known here: nan stands for it
                self._found(state, state.batch_index, state.step, value if not math.isfinite(value) else math.nan,
                            late=False)
            return
        if self._losses is None:
            self._losses = torch.zeros(self.check_every, device=loss.device)
        elif self._losses.device != loss.device:  # restored from a checkpoint, on the CPU
            self._losses = self._losses.to(loss.device)
        if self._pending == 0:
            self._window = []
        self._window.append((state.batch_index, state.step))
        self._losses[self._pending] = loss.float().mean()  # a device copy: no sync
        self._pending += 1
        if self._pending == self.check_every or state.batch_index == state.steps_per_epoch - 1:
            self._check_window(state)

    def eval_end(self, state: Any) -> None:
        # before the epoch's checkpoint: never save weights a bad batch may have reached
        if self._pending:
            self._check_window(state)
        if self.mode == "skip":  # a history.csv column: steps skipped this epoch
            state.epoch_metrics["nonfinite_skipped"] = len(self._skipped_epoch)

    def _check_window(self, state: Any) -> None:
        assert self._losses is not None, "a window is checked only after a loss was recorded in it"
        losses, self._pending = self._losses[:self._pending], 0
        bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()  # one sync per window
        (anywhere,) = agree_any(bool(bad))  # several processes: another rank's bad batch stops this one too
        if anywhere and not bad:
            bad = [len(self._window) - 1]
        if bad:
            batch_index, step = self._window[bad[0]]
            self._found(state, batch_index, step, value=float(losses[bad[0]]), late=batch_index != state.batch_index)

    def _found(self, state: Any, batch_index: int, step: int, value: float, late: bool) -> None:
        where = (f"epoch {state.epoch + 1}/{state.epochs}, batch {batch_index + 1}/{state.steps_per_epoch}, "
                 f"optimizer step {step + 1}")
        if self.mode == "skip" and (self._group_bad or self.skipped < self.max_skipped_steps):
            self._skip(state, where, batch_index, value)
            return
        self._stop(state, where, value, late)

    def _skip(self, state: Any, where: str, batch_index: int, value: float) -> None:
        # zero in place (not set to None): a GradScaler's unscale_ still records its inf check
        for p in state.model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        state.skip_step = True
        # the epoch's train_loss stays finite: this batch counts at the epoch's running mean
        state.loss = (state.loss_sum / max(state.images_seen, 1)).to(state.loss.dtype)
        if self._group_bad:
            return  # the step of this group is already being skipped
        self._group_bad = True
        self.skipped += 1
        record = {"epoch": state.epoch + 1, "batch": batch_index + 1, "step": state.step + 1, "loss": value}
        self._skipped_epoch.append(record)
        state.epoch_details["nonfinite_skipped"] = self._skipped_epoch
        message = (f"non-finite loss ({value}) at {where}: step skipped ({self.skipped} of at most "
                   f"{self.max_skipped_steps} in the run, diagnostics.max_skipped_steps)")
        _warn(message)
        state.note(message, "nonfinite_skipped", **record)

    def after_step(self, state: Any) -> None:
        self._group_bad = False

    def _stop(self, state: Any, where: str, value: float, late: bool) -> None:
        parts = ", ".join(f"{k} {float(v):.4g}" for k, v in state.loss_parts.items()) if not late else ""
        first = first_nonfinite_gradient(state.model)
        gradient = (f"first parameter with a non-finite gradient: {first}" if first
                    else "no parameter has a non-finite gradient yet")
        found = (f" (found at batch {state.batch_index + 1}: diagnostics.nonfinite_check_every is "
                 f"{self.check_every})" if late else "")
        limit = (f"; {self.skipped} step(s) already skipped, all that diagnostics.max_skipped_steps allows"
                 if self.mode == "skip" else "")
        if state.epoch > 0 and state.recipe.output.save_last:
            saved = (f"The checkpoints of epoch {state.epoch} (the last finished) are kept: imgtrain train "
                     f"--resume {state.run_dir} continues from there (add diagnostics.nonfinite=skip to step "
                     "over such batches)")
        elif state.epoch > 0:
            saved = "With output.save_last off there is no checkpoint to resume"
        else:
            saved = "No epoch had finished, so there is no checkpoint to resume"
        message = (f"non-finite training loss ({value}) at {where}{found}{limit}; "
                   + (f"loss parts: {parts}; " if parts else "")
                   + f"{gradient}. Likely causes: {LIKELY_CAUSES}. {saved}")
        state.note("stopped: " + message, "nonfinite_loss", epoch=state.epoch + 1, step=state.step + 1,
                   loss=value, first_nonfinite_gradient=first)
        raise NonFiniteLossError(message)

    def state_dict(self) -> dict[str, Any]:
        # inside an epoch, also the steps skipped in it and the losses not checked yet (deferred checks)
        pending = self._losses[:self._pending].detach().cpu() if self._losses is not None and self._pending else None
        return {"skipped": self.skipped, "skipped_epoch": list(self._skipped_epoch),
                "pending": pending, "window": [list(w) for w in self._window[:self._pending]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self._skipped_epoch = list(state.get("skipped_epoch", []))
        pending = state.get("pending")
        self._pending = 0 if pending is None else len(pending)
        if pending is not None:
            self._losses = torch.zeros(self.check_every)
            self._losses[:self._pending] = pending
            self._window = [tuple(w) for w in state.get("window", [])]


def build_diagnostics(cfg: Any) -> list[Hook]:
    """The diagnostics hooks a recipe's `diagnostics` section asks for: monitor, then guard."""
    hooks: list[Hook] = []
    if cfg.grad_monitor_every:
        hooks.append(GradientMonitorHook(cfg.grad_monitor_every, cfg.vanishing_below, cfg.exploding_above))
    if cfg.nonfinite != "off":
        hooks.append(NonFiniteGuardHook(cfg.nonfinite, cfg.nonfinite_check_every, cfg.max_skipped_steps))
    return hooks


class Diagnostics(Strategy):
    name, section = "diagnostics", "diagnostics"

    def enabled(self, recipe: Any) -> bool:
        cfg = recipe.diagnostics
        return bool(cfg.grad_monitor_every) or cfg.nonfinite != "off"

    def check(self, recipe: Any) -> None:
        check_diagnostics(recipe.diagnostics, file=recipe.source_file)

    def build(self, recipe: Any, context: StrategyContext | None) -> list[Hook]:
        return build_diagnostics(recipe.diagnostics)


__all__ = ["Diagnostics", "GradientFlags", "GradientMonitorHook", "NonFiniteGuardHook", "NonFiniteLossError",
           "build_diagnostics", "check_diagnostics", "classify_gradients", "first_nonfinite_gradient",
           "gradient_norms", "layer_of", "missing_gradients", "total_norm"]
