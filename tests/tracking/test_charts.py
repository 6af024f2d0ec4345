"""The charts of plots.py as the report inlines them: each SVG holds the history's series, labels
and points; the PNG and the SVG come from one figure; a skipped redraw is made up for the report."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET

import pytest

from imgtrain.tracking.plots import SERIES_ID, PlotTracker, chart_svgs, draw_charts, lr_chart, svg_element

SVG = "{http://www.w3.org/2000/svg}"


def history(epochs: int = 4) -> list[dict]:
    """Rows like history.csv's; val_loss of epoch 2 is missing (inf): a gap in its line."""
    return [{"epoch": e + 1, "train_loss": 1 / (e + 1), "val_loss": math.inf if e == 1 else 0.8 / (e + 1),
             "train_acc": 0.5 + 0.1 * e, "val_acc": 0.55 + 0.1 * e, "lr": 0.1 * 0.5 ** e, "momentum": 0.9,
             "epoch_seconds": 2.5 + e, "images_per_second": 50.0 + e} for e in range(epochs)]


def series(svg: str) -> dict[str, ET.Element]:
    """SERIES_ID + column -> that curve's <g> in the chart."""
    root = ET.fromstring(svg)  # also proves the element is well-formed XML
    return {g.get("id")[len(SERIES_ID):]: g for g in root.iter(f"{SVG}g")
            if g.get("id", "").startswith(SERIES_ID)}


def texts(svg: str) -> list[str]:
    """Every text matplotlib drew (as glyph paths, each preceded by a comment holding the text)."""
    return re.findall(r"<!-- (.*?) -->", svg)


def markers(group: ET.Element) -> int:
    return sum(1 for _ in group.iter(f"{SVG}use"))


def test_each_chart_holds_its_series_labels_and_points():
    rows = history(4)
    lr = [(s, 0.1 * 0.999 ** s) for s in range(1, 5001)]  # decays 150x: a log axis
    charts = chart_svgs(rows, lr, [(s, 0.9) for s in range(1, 5001)])
    assert list(charts) == ["loss", "accuracy", "lr", "momentum", "throughput", "epoch_time"]

    loss = charts["loss"]
    assert loss.startswith('<svg class="chart" role="img" aria-label="Loss" ') and "<?xml" not in loss
    lines = series(loss)
    assert list(lines) == ["train_loss", "val_loss"]
    assert markers(lines["train_loss"]) == 4 and markers(lines["val_loss"]) == 3  # one point per epoch, inf left out
    val_path = lines["val_loss"].find(f"{SVG}path").get("d")
    assert val_path.count("M") == 2  # the missing epoch breaks the line in two
    words = texts(loss)
    assert {"Loss", "epoch", "loss", "train_loss", "val_loss"} <= set(words)  # title, axes, legend
    assert [w for w in words if w.isdigit()] == ["1", "2", "3", "4"]  # whole epochs on the x axis

    accuracy = texts(charts["accuracy"])
    assert {"Accuracy", "accuracy (%)", "train_acc", "val_acc"} <= set(accuracy)
    assert "val_balanced_acc" not in accuracy  # not in this history
    acc_ticks = [float(w) for w in accuracy if re.fullmatch(r"[\d.]+", w) and float(w) > 4]
    assert min(acc_ticks) <= 55 and max(acc_ticks) >= 85  # in %, not fractions

    assert list(series(charts["lr"])) == ["lr"]
    lr_words = texts(charts["lr"])
    assert {"Learning rate per optimizer step", "optimizer step", "lr"} <= set(lr_words)
    assert any("10^{-1}" in w for w in lr_words) and any("10^{-2}" in w for w in lr_words)  # log axis
    assert "Momentum per optimizer step" in texts(charts["momentum"])
    assert markers(series(charts["throughput"])["images_per_second"]) == 4
    assert {"Throughput", "training images / s"} <= set(texts(charts["throughput"]))
    assert {"Epoch time", "seconds"} <= set(texts(charts["epoch_time"]))


def test_without_a_step_record_lr_and_momentum_are_per_epoch():
    figures = draw_charts(history(3))
    assert figures["lr"].axes[0].get_title() == "Learning rate per epoch"
    assert figures["lr"].axes[0].get_yscale() == "linear"  # 0.1 to 0.025: not wide enough for log
    assert markers(series(svg_element(figures["momentum"]))["momentum"]) == 3
    # a history with nothing but losses draws only the loss chart
    assert list(draw_charts([{"epoch": 1, "train_loss": 0.5}])) == ["loss"]
    assert draw_charts([]) == {}


def test_a_long_step_record_is_decimated_before_drawing():
    steps = [(s, 0.9 + 0.05 * math.sin(s / 50)) for s in range(1, 20001)]  # no straight runs to simplify away
    line = lr_chart([], steps).axes[0].lines[0]
    assert 2000 <= len(line.get_xdata()) <= 2001 and line.get_xdata()[-1] == 20000


def test_the_tracker_keeps_the_svgs_of_the_pngs_it_wrote(run_dir, make_state, fake_loop):
    state = make_state(epochs=3, steps_per_epoch=4)
    tracker = PlotTracker(run_dir, redraw_budget_factor=1e6)  # every redraw before the last is skipped
    loop = fake_loop(state, [tracker])
    loop.hooks.fire("fit_start", state)
    loop.run_epoch()
    loop.run_epoch()
    assert tracker.charts == {} and not (run_dir / "plots").exists()
    # the report asks for the charts of epoch 2: the skipped redraw is made now, PNGs and SVGs together
    charts = tracker.current_charts(state)
    assert sorted(charts) == sorted(p.stem for p in (run_dir / "plots").glob("*.png"))
    assert markers(series(charts["loss"])["val_loss"]) == 2
    assert list(series(charts["lr"])) == ["lr"] and "Learning rate per optimizer step" in texts(charts["lr"])
    assert tracker.current_charts(state) == charts  # nothing new: no second draw


@pytest.mark.parametrize("title", ['Loss & "accuracy" <1>'])
def test_svg_element_escapes_its_label(title):
    figure = draw_charts(history(2))["loss"]
    figure.axes[0].set_title(title)
    element = svg_element(figure)
    assert ET.fromstring(element).get("aria-label") == title
