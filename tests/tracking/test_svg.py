"""The report's SVG charts: tick values, point positions, gaps and the log axis."""

import re

import pytest

from imgtrain.tracking.svg import HEIGHT, MARGIN_BOTTOM, MARGIN_LEFT, MARGIN_TOP, WIDTH, line_chart, nice_ticks


@pytest.mark.parametrize("low, high, expected", [
    (0.0, 1.0, [0.0, 0.25, 0.5, 0.75, 1.0]),
    (1.0, 15.0, [5.0, 10.0, 15.0]),
    (0.82, 0.97, [0.85, 0.9, 0.95]),
    (3.0, 3.0, [3.0]),
])
def test_nice_ticks(low, high, expected):
    assert nice_ticks(low, high) == pytest.approx(expected)


def points(svg: str):
    return [[tuple(map(float, p.split(","))) for p in line.split()]
            for line in re.findall(r'<polyline[^>]* points="([^"]+)"', svg)]


def test_points_land_where_their_values_say():
    svg = line_chart({"a": [(1, 0.0), (2, 1.0), (3, 0.5)]}, "T", "epoch", "y")
    (line,) = points(svg)
    xs = [x for x, _ in line]
    assert xs[0] == pytest.approx(MARGIN_LEFT) and xs[-1] == pytest.approx(WIDTH - 12)
    assert xs[1] == pytest.approx((xs[0] + xs[2]) / 2)
    ys = [y for _, y in line]
    assert ys[0] > ys[2] > ys[1]  # SVG y grows downwards: 0 lowest, 1 highest
    assert ys[2] == pytest.approx((ys[0] + ys[1]) / 2)
    assert MARGIN_TOP < ys[1] and ys[0] < HEIGHT - MARGIN_BOTTOM
    assert svg.count("<circle") == 3


def test_a_missing_value_breaks_the_line_and_an_empty_chart_is_empty():
    svg = line_chart({"a": [(1, 1.0), (2, 2.0), (3, float("nan")), (4, 1.0), (5, 3.0)]}, "T", "x", "y")
    assert [len(line) for line in points(svg)] == [2, 2]
    assert line_chart({"a": [(1, float("nan"))]}, "T", "x", "y") == ""


def test_log_axis_spaces_decades_evenly():
    svg = line_chart({"lr": [(1, 1e-4), (2, 1e-3), (3, 1e-2)]}, "T", "step", "lr", log_y=True)
    (line,) = points(svg)
    ys = [y for _, y in line]
    assert ys[0] - ys[1] == pytest.approx(ys[1] - ys[2])
    assert ">0.001<" in svg and ">0.01<" in svg


def test_two_series_get_a_legend():
    svg = line_chart({"train_loss": [(1, 1.0), (2, 0.5)], "val_loss": [(1, 1.2), (2, 0.7)]}, "Loss", "epoch", "loss")
    assert ">train_loss<" in svg and ">val_loss<" in svg and len(points(svg)) == 2
