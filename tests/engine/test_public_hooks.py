"""`imgtrain.train(recipe, hooks=[...])`: a user's own hook sees the loop's events and the state, and
reports through state.note; a run without it is unchanged."""

from __future__ import annotations

import torch

import imgtrain
from imgtrain.tracking import read_history


class WeightNorms(imgtrain.Hook):
    """The README's example: the L2 norm of every layer's weight at the end of each epoch."""

    name = "weight_norms"

    def __init__(self):
        self.norms: list[dict[str, float]] = []

    def epoch_end(self, state):
        norms = {name: float(p.detach().norm()) for name,
                 p in state.model.named_parameters() if name.endswith("weight")}
        self.norms.append(norms)
        state.note(f"largest weight norm {max(norms.values()):.3f}", "weight_norms", epoch=state.epoch + 1, **norms)


def recipe():
    return imgtrain.load_recipe("quickstart", [
        "model.name=imgtrain_cnn_tiny", "augment.img_size=8", "train.epochs=2", "train.max_steps_per_epoch=4",
        "output.progress=off", "output.plots=false", "output.report=false", "train.threads=1",
        "train.deterministic=true"])


def test_a_user_hook_sees_every_epoch_and_writes_to_the_run_log(tmp_path):
    hook = WeightNorms()
    result = imgtrain.train(recipe(), run_dir=tmp_path / "run", hooks=[hook])
    assert len(hook.norms) == 2
    # the hook read the real weights: the last reading is the final model's
    final = {name: float(p.norm()) for name, p in result.model.named_parameters() if name.endswith("weight")}
    if (tmp_path / "run" / "checkpoints" / "best.safetensors").is_file() and result.summary.get("best_epoch") != 2:
        final = None  # the test pass loaded the best epoch's weights into result.model
    if final is not None:
        assert hook.norms[-1] == final
    assert hook.norms[0] != hook.norms[1]  # training moved the weights between the epochs
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("largest weight norm") == 2
    events = (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    assert sum('"event": "weight_norms"' in line for line in events) == 2


def test_a_hook_that_only_reads_changes_nothing(tmp_path):
    plain = imgtrain.train(recipe(), run_dir=tmp_path / "plain")
    watched = imgtrain.train(recipe(), run_dir=tmp_path / "watched", hooks=[WeightNorms()])
    keep = ("train_loss", "val_loss", "val_acc", "lr")
    assert [[r[k] for k in keep] for r in read_history(plain.run_dir / "history.csv")] == \
        [[r[k] for k in keep] for r in read_history(watched.run_dir / "history.csv")]
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                 watched.model.state_dict().values()))
