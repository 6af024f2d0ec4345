"""The loop's events and the `Hook` base class every strategy and tracker extends.

The Trainer (engine/loop.py) runs this, firing each event on the hooks in order:

    fit_start
    for epoch in epochs:
        epoch_start
        for batch in train_loader:
            batch_start        # a strategy may replace state.inputs / state.targets
            outputs = model(inputs)            (under autocast)
            after_forward      # state.outputs holds the logits
            loss = loss_fn(outputs, targets)   (under autocast)
            after_loss         # a strategy may replace state.loss (and name its parts in state.loss_parts)
            backward(loss / grad_accum_steps)
            after_backward     # gradients of this batch are accumulated
            if the accumulation group is complete:
                while a hook set state.repeat_group (at after_backward; SAM's second pass):
                    replay the group's batches: forward, after_forward, loss, after_loss,
                    backward, after_backward (state.pass_index counts the passes)
                unscale, clip
                before_step    # gradients are final and unscaled here; a hook may set state.skip_step
                optimizer.step() unless skipped; scheduler.step()
                after_step     # a hook may set state.stop_training: the epoch ends here
        before_eval            # the epoch's training is done (train metrics set); SWA averages here
        validate
        eval_end               # state.epoch_metrics has the train and val numbers
        epoch_end              # history row appended; then the checkpoints are saved, with every hook's state
    fit_end

Under several processes (DDP) `sync_ranks` is fired on every rank at the same point: at the end of each
epoch's training (before before_eval) and before a mid-epoch training state is saved. A hook that keeps
something per process (the self-paced losses of the images its rank saw) merges it there with the
collectives of engine/distributed.py; in one process it is never fired.

A hook implements only the methods of the events it needs. `on_note(message, event, fields)` is no
loop event: it receives what hooks report with `state.note(...)`, so a strategy can write to the
run's log without knowing the trackers; `on_image(name, image, step)` likewise receives what hooks log
with `state.log_image(...)`. Strategies (which change the batch, model, optimizer or
schedule) run before trackers (which only read), each list in declared order. A training state may be
saved after any optimizer step (train.checkpoint_every, a stop signal): what a hook keeps across batches
belongs in its `state_dict`, and its `epoch_start` keeps what was restored when `state.resumed_batches > 0`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.profiler import record_function

EVENTS = ("fit_start", "epoch_start", "batch_start", "after_forward", "after_loss", "after_backward", "before_step",
          "after_step", "before_eval", "eval_end", "epoch_end", "fit_end", "sync_ranks")


class Hook:
    """Base class: override the event methods you need; each gets the TrainState."""

    name: str = "hook"  # its key in checkpoints (hook state) and logs

    def fit_start(self, state: Any) -> None: ...
    def epoch_start(self, state: Any) -> None: ...
    def batch_start(self, state: Any) -> None: ...
    def after_forward(self, state: Any) -> None: ...
    def after_loss(self, state: Any) -> None: ...
    def after_backward(self, state: Any) -> None: ...
    def before_step(self, state: Any) -> None: ...
    def after_step(self, state: Any) -> None: ...
    def before_eval(self, state: Any) -> None: ...
    def eval_end(self, state: Any) -> None: ...
    def epoch_end(self, state: Any) -> None: ...
    def fit_end(self, state: Any) -> None: ...
    def sync_ranks(self, state: Any) -> None: ...

    def on_note(self, message: str, event: str | None, fields: dict[str, Any]) -> None:
        """A line another hook reported with `state.note` (trackers write it down)."""

    def on_image(self, name: str, image: Any, step: int) -> None:
        """An image a hook logged with `state.log_image` at optimizer step `step` (experiment trackers
        send it on): a uint8 (H, W, C) or (C, H, W) array or tensor, or a matplotlib Figure."""

    def state_dict(self) -> dict[str, Any]:
        """What a resume needs; hooks without state return {}."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


class HookList:
    """Strategies then trackers, each in declared order. Per event it keeps only the hooks that
    override it, so an event nobody listens to costs one empty loop per batch."""

    def __init__(self, strategies: Sequence[Hook] = (), trackers: Sequence[Hook] = ()):
        self.strategies: list[Hook] = list(strategies)
        self.trackers: list[Hook] = list(trackers)
        ordered = self.strategies + self.trackers
        names = [h.name for h in ordered]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"hook names must be unique, got duplicates: {sorted(duplicates)}")
        self._listeners: dict[str, list[Any]] = {
            event: [getattr(h, event) for h in ordered
                    if getattr(type(h), event) is not getattr(Hook, event)]
            for event in EVENTS
        }
        self._note_listeners = [h for h in ordered if type(h).on_note is not Hook.on_note]
        self._image_listeners = [h for h in ordered if type(h).on_image is not Hook.on_image]
        # a hook that replays batches (state.repeat_group) needs the loop to keep each group's batches
        self.replays_group = any(getattr(h, "replays_group", False) for h in ordered)

    def __iter__(self):
        return iter(self.strategies + self.trackers)

    def note(self, message: str, event: str | None, fields: dict[str, Any]) -> None:
        for hook in self._note_listeners:
            hook.on_note(message, event, fields)

    def image(self, name: str, image: Any, step: int) -> None:
        for hook in self._image_listeners:
            hook.on_image(name, image, step)

    def fire(self, event: str, state: Any) -> None:
        listeners = self._listeners[event]
        if not listeners:
            return
        with record_function(f"imgtrain/hook/{event}"):  # `imgtrain profile`: the hooks' share of a step
            for method in listeners:
                method(state)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {h.name: state for h in self if (state := h.state_dict())}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        for hook in self:
            if hook.name in states:
                hook.load_state_dict(states[hook.name])
