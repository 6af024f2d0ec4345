"""plots/*.png: valid PNGs redrawn every epoch; the per-step record is bounded and resumable."""

from __future__ import annotations

import hashlib
import io

import pytest
import torch

from imgtrain.tracking.plots import PlotTracker, decimate, plot_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = ["accuracy.png", "epoch_time.png", "loss.png", "lr.png", "momentum.png", "throughput.png"]


def _digests(plot_dir):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in plot_dir.glob("*.png")}


def test_plots_are_valid_pngs_redrawn_each_epoch(run_dir, make_state, fake_loop):
    state = make_state(epochs=2, steps_per_epoch=8)
    tracker = PlotTracker(run_dir, redraw_budget_factor=0)  # fake epochs take no time: never skip
    loop = fake_loop(state, [tracker])
    plot_dir = run_dir / "plots"

    loop.run_epoch()
    tracker.wait()  # drawing happens on a background thread
    assert sorted(p.name for p in plot_dir.iterdir()) == NAMES  # no temp files left
    for name in NAMES:
        data = (plot_dir / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 5000  # axes, labels and a curve, not an empty image
    first = _digests(plot_dir)

    loop.run_epoch()
    tracker.wait()
    second = _digests(plot_dir)
    assert set(second) == set(NAMES)
    # every plot gained data, so every file was redrawn
    assert all(first[name] != second[name] for name in NAMES)
    assert sorted(p.name for p in plot_dir.iterdir()) == NAMES

    # the lr each step used (StepLR halves it after 8 steps) and momentum, at every step
    assert tracker.steps == list(range(1, 17))
    assert tracker.lr == pytest.approx([0.1] * 8 + [0.05] * 8)
    assert tracker.momentum == [0.9] * 16


def test_short_epochs_skip_redraws_but_the_last_epoch_always_draws(run_dir, make_state, fake_loop):
    state = make_state(epochs=4, steps_per_epoch=4)
    tracker = PlotTracker(run_dir, redraw_budget_factor=1e6)  # any redraw "costs" more than an epoch
    loop = fake_loop(state, [tracker])
    loop.hooks.fire("fit_start", state)  # the budget starts with training: no early draw
    loop.run_epoch()
    loop.run_epoch()
    loop.run_epoch()
    tracker.wait()
    assert not (run_dir / "plots").exists()  # epochs 1 to 3 skipped their redraw
    loop.run_epoch()  # the last epoch draws whatever the budget
    tracker.wait()
    final = _digests(run_dir / "plots")
    assert sorted(final) == NAMES
    assert tracker.steps == list(range(1, 17))  # recorded every step even while not drawing


def test_a_skipped_redraw_is_made_up_at_fit_end(run_dir, make_state, fake_loop):
    state = make_state(epochs=4, steps_per_epoch=4)
    tracker = PlotTracker(run_dir, redraw_budget_factor=1e6)
    loop = fake_loop(state, [tracker])
    loop.fit(epochs=2)  # stopped early (e.g. a KeyboardInterrupt path): fit_end draws what was skipped
    assert sorted(_digests(run_dir / "plots")) == NAMES


@pytest.mark.parametrize("background", [True, False])
def test_a_failed_draw_is_raised_in_the_loops_thread(run_dir, make_state, fake_loop, background):
    (run_dir / "plots").write_text("a file where the plots folder should be")
    state = make_state(epochs=1, steps_per_epoch=2)
    tracker = PlotTracker(run_dir, redraw_budget_factor=0, background=background)
    loop = fake_loop(state, [tracker])
    with pytest.raises(FileExistsError):
        loop.run_epoch()
        tracker.wait()


def test_state_round_trip_through_a_weights_only_checkpoint(run_dir, make_state, fake_loop):
    state = make_state(epochs=3, steps_per_epoch=8)
    tracker = PlotTracker(run_dir)
    fake_loop(state, [tracker]).run_epoch()
    tracker.wait()  # no fit_end here to wait for the background draw; one left running dies at exit

    buffer = io.BytesIO()
    torch.save({"hooks": {"plots": tracker.state_dict()}}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)["hooks"]["plots"]

    restored = PlotTracker(run_dir)
    restored.load_state_dict(saved)
    assert restored.state_dict() == tracker.state_dict()
    assert restored.steps == list(range(1, 9))

    # the resumed run keeps recording after the restored points
    state.optimizer.param_groups[0]["lr"] = 0.01
    fake_loop(state, [restored]).run_epoch()
    restored.wait()
    assert restored.steps == list(range(1, 17))
    assert restored.lr[8:] == pytest.approx([0.01] * 8)


def test_record_stays_bounded_and_evenly_spaced(run_dir, make_state, fake_loop):
    state = make_state(epochs=1, steps_per_epoch=1000)
    tracker = PlotTracker(run_dir, max_points=100)
    for step in range(1000):
        state.step = step  # steps taken so far; before_step records step + 1
        tracker.before_step(state)
    assert 50 <= len(tracker.steps) <= 100
    gaps = {b - a for a, b in zip(tracker.steps[:-1], tracker.steps[1:], strict=True)}
    assert gaps == {tracker.stride} and tracker.stride == 16
    assert tracker.steps[-1] > 1000 - tracker.stride
    assert len(tracker.lr) == len(tracker.momentum) == len(tracker.steps)


def test_load_state_dict_refuses_mismatched_lists(run_dir):
    with pytest.raises(ValueError, match="inconsistent"):
        PlotTracker(run_dir).load_state_dict({"steps": [1, 2], "lr": [0.1], "momentum": [0.9, 0.9]})


def test_plot_history_without_a_hook(tmp_path):
    rows = [{"epoch": 1, "train_loss": 1.2, "val_acc": 0.4},
            {"epoch": 2, "train_loss": float("inf"), "val_acc": 0.6}]
    lr = [(s, 0.1 * (0.999 ** s)) for s in range(5000)]
    written = plot_history(rows, lr, [], tmp_path / "out")
    # momentum, throughput and epoch time have no data, so no PNG
    assert [p.name for p in written] == ["loss.png", "accuracy.png", "lr.png"]
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in written)
    assert not (tmp_path / "out" / "momentum.png").exists()


def test_decimate_keeps_the_last_point():
    points = [(i, float(i)) for i in range(4999)]
    kept = decimate(points, 1000)
    assert len(kept) <= 1001
    assert kept[0] == (0, 0.0) and kept[-1] == (4998, 4998.0)
    assert decimate(points[:10], 1000) == points[:10]
