"""`imgtrain compare`: real runs on digits (two learning rates, one evaluated with TTA, an ensemble of
both, a small study), the table checked against each run's own history.csv and summary.json, the
Markdown/CSV/HTML files, the HTML rendered in headless chromium, and the errors."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

import pytest

from imgtrain.cli import main
from imgtrain.tracking import read_history, read_summary
from imgtrain.tracking.compare import collect, validation_curve

TINY = ["model.name=imgtrain_cnn_tiny", "train.threads=1", "train.epochs=3", "output.progress=off",
        "output.plots=false", "output.report=false", "data.batch_size=64"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two quickstart runs that differ in optim.lr only, the first also evaluated with flip TTA."""
    root = tmp_path_factory.mktemp("compare")
    for name, lr in (("fast", "0.1"), ("slow", "0.003")):
        assert main(["train", "quickstart", *TINY, f"optim.lr={lr}", "--run-dir", str(root / name)]) == 0
    assert main(["evaluate", str(root / "fast"), "--tta"]) == 0
    return root


def test_table_holds_each_runs_own_numbers(runs, capsys):
    capsys.readouterr()
    assert main(["compare", str(runs / "fast"), str(runs / "slow"), "--target", "0.9"]) == 0
    printed = capsys.readouterr().out
    rows = {row.label: row for row in collect([runs / "fast", runs / "slow"])}
    assert list(rows) == ["fast", "fast + TTA", "slow"]
    for name in ("fast", "slow"):
        row, history, summary = rows[name], read_history(runs / name / "history.csv"), read_summary(runs / name)
        accuracies = [r["val_acc"] for r in history]
        # (history.csv rounds to 6 digits; events.jsonl, which the table reads, does not)
        assert row.best_val == pytest.approx(max(accuracies), abs=1e-6)
        assert row.final_val == pytest.approx(accuracies[-1], abs=1e-6)
        assert row.test_acc == summary["test_acc"] and row.epochs == 3 == summary["epochs_run"]
        assert row.wall_seconds == summary["wall_seconds"]
        assert row.images_per_second == summary["images_per_second"]
        assert row.model == "imgtrain_cnn_tiny" and row.parameters > 1000
        # the strategy column: what differs from the first run's recipe
        assert row.strategy == ("baseline: optim.lr=0.1" if name == "fast" else "optim.lr=0.003")
        # the time-to-target columns follow history.csv: the first epoch at or above 0.9
        first = next((r["epoch"] for r in history if r["val_acc"] >= 0.9), None)
        reached = row.reached(0.9)
        assert (reached[0] if reached else None) == first
        seconds = [s for _, s, _ in row.curve]
        assert seconds == sorted(seconds) and 0 < seconds[-1] <= summary["wall_seconds"] + 0.5
        assert f"{row.best_val:.4f}" in printed
    # the two lrs really differ, so the table has something to show
    assert rows["fast"].best_val > rows["slow"].best_val
    assert rows["fast"].reached(0.9) is not None and rows["slow"].reached(0.9) is None
    metrics = json.loads((runs / "fast" / "evaluation" / "test" / "metrics.json").read_text())
    assert rows["fast + TTA"].test_acc == metrics["acc"] and rows["fast + TTA"].strategy.startswith("test-time")
    assert "epochs to 0.9" in printed and "s to 0.9" in printed


def test_markdown_csv_and_html_files(runs, tmp_path, headless_chromium):
    md, table, page = tmp_path / "compare.md", tmp_path / "compare.csv", tmp_path / "compare.html"
    assert main(["compare", str(runs / "fast"), str(runs / "slow"), "--target", "0.9",
                 "--output", str(md), "--output", str(table), "--output", str(page)]) == 0
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| run | strategy |") and lines[1].startswith("|---|")
    assert [line.split("|")[1].strip() for line in lines[2:5]] == ["fast", "fast + TTA", "slow"]
    with open(table, newline="") as handle:
        records = list(csv.DictReader(handle))
    slow = read_summary(runs / "slow")
    assert float(records[2]["test acc"]) == slow["test_acc"] and records[2]["epochs to 0.9"] == ""
    assert float(records[0]["epochs to 0.9"]) >= 1 and records[0]["path"] == str(runs / "fast")
    # the page in a real browser: the table, and both charts with a laid-out curve per run
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = headless_chromium(f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000", "--dump-dom",
                            probe.as_uri())
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    seen = json.loads(html.unescape(dom[start:dom.index("</pre>", start)]))
    assert [r[0] for r in seen["rows"][1:]] == ["fast", "fast + TTA", "slow"]
    assert [label for label, _, _ in seen["charts"]] == ["val_acc per epoch", "val_acc against wall time"]
    assert all(curves == 2 and width > 300 for _, curves, width in seen["charts"])


PROBE = """<script>
window.addEventListener('load', () => {
  const rows = [...document.querySelector('#comparison').rows].map(r => [...r.cells].map(c => c.innerText.trim()));
  const charts = [...document.querySelectorAll('svg.chart')].map(
    svg => [svg.getAttribute('aria-label'),
            [...svg.querySelectorAll('g[id^="series-"]')].filter(g => g.getBBox().width > 0).length,
            svg.getBoundingClientRect().width]);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({rows, charts});
  document.body.appendChild(out);
});
</script>"""


def test_ensemble_and_study_folders(runs, tmp_path, capsys):
    ensemble = tmp_path / "both"
    assert main(["ensemble", str(runs / "fast"), str(runs / "slow"), "--save", str(ensemble)]) == 0
    [row] = collect([ensemble])
    assert row.test_acc is None and "imgtrain evaluate" in row.note  # not evaluated yet: says how
    assert main(["evaluate", str(ensemble)]) == 0
    [row] = collect([ensemble])
    metrics = json.loads((ensemble / "evaluation" / "test" / "metrics.json").read_text())
    assert row.test_acc == metrics["acc"] and row.strategy == "ensemble of 2 (soft vote)"
    members = [read_summary(runs / name) for name in ("fast", "slow")]
    assert row.wall_seconds == pytest.approx(sum(m["wall_seconds"] for m in members))
    assert row.epochs == 6
    # a study folder: its best trial, named in best.yaml; --all-trials: every trial
    recipe = tmp_path / "search.yaml"
    recipe.write_text("extends: quickstart\nmodel: {name: imgtrain_cnn_tiny}\ntrain: {epochs: 1, threads: 1}\n"
                      "output: {progress: 'off', plots: false, report: false}\n"
                      "search: {sampler: random, params: {optim.lr: 'choice(0.003, 0.1)'}}\n")
    assert main(["tune", str(recipe), f"output.root={tmp_path}", "--study", "lr", "--trials", "2"]) == 0
    study = tmp_path / "lr"
    best_line = (study / "best.yaml").read_text().splitlines()[0]
    [best] = collect([study])
    assert best.kind == "trial" and best.label.startswith("lr/trial-")
    assert best_line.startswith(f"# The best trial ({int(best.label[-4:])}: ")
    everyone = collect([study], all_trials=True)
    assert [r.label for r in everyone] == ["lr/trial-0000", "lr/trial-0001"]
    with open(study / "study.csv", newline="") as handle:
        by_trial = {int(r["trial"]): float(r["val_acc"]) for r in csv.DictReader(handle)}
    assert [r.best_val for r in everyone] == pytest.approx([by_trial[0], by_trial[1]])


def test_resumed_run_counts_only_its_epochs_time(tmp_path):
    """After a resume the clock continues from the last finished epoch, not from the kill."""
    run = tmp_path / "run"
    run.mkdir()
    events = [("fit_start", "2026-01-01T10:00:00+00:00", None, None),
              ("epoch_end", "2026-01-01T10:00:10+00:00", 1, 0.5),
              ("epoch_end", "2026-01-01T10:00:20+00:00", 2, 0.7),
              # killed during epoch 3; resumed an hour later from the end of epoch 2
              ("fit_start", "2026-01-01T11:00:00+00:00", None, None),
              ("epoch_end", "2026-01-01T11:00:12+00:00", 3, 0.8)]
    (run / "events.jsonl").write_text("".join(
        json.dumps({"event": e, "time": t, **({"epoch": n, "val_acc": v} if n else {})}) + "\n"
        for e, t, n, v in events) + '{"event": "epoch_e')  # and a last line cut by a kill
    assert validation_curve(run, "val_acc") == [(1, 10.0, 0.5), (2, 20.0, 0.7), (3, 32.0, 0.8)]


def test_errors_say_what_and_where(runs, tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["compare", str(tmp_path)]) == 2
    assert "not a run folder (config.yaml), a study folder" in capsys.readouterr().err
    assert main(["compare", str(runs / "fast"), "--output", str(tmp_path / "table.txt")]) == 2
    err = capsys.readouterr().err
    assert "table.txt: give a file ending in .md, .html, .csv" in err and not (tmp_path / "table.txt").exists()
    assert main(["compare", str(runs / "fast"), "--target", "90"]) == 2
    assert "--target 90.0: give the val_acc to reach as a fraction in (0, 1]" in capsys.readouterr().err
    # a loss goes the other way: best is the lowest, a target is reached by falling to it
    [row, _] = collect([runs / "fast"], metric="val_loss")
    losses = [r["val_loss"] for r in read_history(runs / "fast" / "history.csv")]
    assert row.best_val == pytest.approx(min(losses), abs=1e-6) and row.reached(losses[0] + 1e-6)[0] == 1


def test_curve_without_event_log_uses_history(runs, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.yaml", "history.csv"):
        (copy / name).write_bytes((runs / "slow" / name).read_bytes())
    history = read_history(copy / "history.csv")
    curve = validation_curve(Path(copy), "val_acc")
    assert [e for e, _, _ in curve] == [1, 2, 3]
    assert curve[-1][1] == pytest.approx(sum(r["epoch_seconds"] for r in history))
    [row] = collect([copy])
    assert row.note.startswith("no summary.json") and row.final_val == history[-1]["val_acc"]
