"""report.html: drawn from a real run on digits, checked as HTML, rebuilt from the run folder,
and rendered in a real headless browser (Debian's chromium) that must load every image."""

from __future__ import annotations

import html
import html.parser
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imgtrain.tracking.report as report_module
from imgtrain.api import load_recipe, train
from imgtrain.cli import main
from imgtrain.engine.events import Hook
from imgtrain.tracking import REPORT_FILE, read_history, read_summary

TINY = ["model.name=imgtrain_cnn_tiny", "train.threads=1", "train.epochs=3", "output.progress=off",
        "train.deterministic=true", "data.batch_size=64"]


class Tables(html.parser.HTMLParser):
    """Every <table id=...> as rows of cell texts, and every <img> with its src kind."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.meta_refresh, self.charts = {}, [], False, []
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", f"table{len(self.tables)}"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(attrs.get("src", "")[:22])
            if self._cell is not None:
                self._cell.append("<img>")
        elif tag == "meta" and attrs.get("http-equiv") == "refresh":
            self.meta_refresh = True
        elif tag == "svg":
            self.charts.append(attrs.get("aria-label"))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse(path: Path) -> Tables:
    parser = Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """A 3-epoch run whose report is redrawn at every epoch end (no time budget)."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    return train(load_recipe("quickstart", [*TINY, "output.redraw=every_epoch"]), run_dir=run_dir)


def test_report_holds_the_runs_numbers(report_run):
    run_dir = report_run.run_dir
    page = parse(run_dir / REPORT_FILE)
    summary, history = read_summary(run_dir), read_history(run_dir / "history.csv")
    headline = {row[0]: row[1] for row in page.tables["summary-table"][1:]}
    assert headline["test accuracy"] == f"{summary['test_acc']:.2%}"
    assert headline["best validation accuracy"] == f"{summary['best_val_acc']:.2%}"
    # one history row per epoch, with the run's val accuracy and loss
    rows = page.tables["history-table"]
    header = rows[0]
    assert [r[header.index("val_acc")] for r in rows[1:]] == [f"{h['val_acc']:.2%}" for h in history]
    assert [float(r[header.index("train_loss")]) for r in rows[1:]] == pytest.approx(
        [h["train_loss"] for h in history], abs=1e-4)
    # per class: ten digits, supports adding up to the validation split, recalls matching val_acc
    per_class = page.tables["per-class-table"][1:]
    assert [r[0] for r in per_class] == [str(i) for i in range(10)]
    support = [int(r[4]) for r in per_class]
    recalls = [float(r[2]) for r in per_class]
    assert sum(r * s for r, s in zip(recalls, support)) / sum(support) == pytest.approx(history[-1]["val_acc"],
                                                                                       abs=1e-3)
    # the worst images: highest loss first, each with its image and Grad-CAM
    worst = page.tables["worst-table"][1:]
    assert 1 <= len(worst) <= report_module.WORST_SHOWN
    losses = [float(r[-1]) for r in worst]
    assert losses == sorted(losses, reverse=True) and losses[0] > 0
    assert all(r[1] == "<img>" and r[2] == "<img>" for r in worst)
    # the training samples and two per worst image, all inline; the six charts are inline SVG
    assert len(page.images) == 1 + 2 * len(worst)
    assert all(src.startswith("data:image/png;base64") for src in page.images)  # self-contained
    assert page.charts == ["Loss", "Accuracy", "Learning rate per optimizer step", "Momentum per optimizer step",
                           "Throughput", "Epoch time"]
    # the confusion matrix holds the validation counts: its diagonal is the correct ones
    confusion = page.tables["confusion-table"]
    assert [r[0] for r in confusion[1:]] == [str(i) for i in range(10)]
    counts = [[int(v) for v in r[1:]] for r in confusion[1:]]
    assert [sum(r) for r in counts] == support
    assert sum(counts[i][i] for i in range(10)) / sum(support) == pytest.approx(history[-1]["val_acc"], abs=1e-6)
    assert not page.meta_refresh  # finished: the page stops reloading itself
    timing = {row[0]: row[1] for row in page.tables["timing-table"]}
    assert float(timing["peak host memory mb"]) == pytest.approx(summary["peak_host_memory_mb"], rel=1e-3)
    assert (run_dir / "plots" / "train_samples.png").is_file()


class PageReader(Hook):
    """Reads report.html as the report left it: at each epoch start (the page of the epoch before) and at
    fit_end (the last epoch's page; user hooks run before the trackers, so finish has not rewritten it)."""

    name = "page_reader"

    def __init__(self, run_dir):
        self.path, self.seen = run_dir / REPORT_FILE, []

    def read(self):
        if self.path.is_file():
            page = parse(self.path)
            self.seen.append((page.meta_refresh, len(page.tables["history-table"]) - 1))

    def epoch_start(self, state):
        self.read()

    def fit_end(self, state):
        self.read()


def test_report_is_redrawn_live_during_training(tmp_path):
    """While training, each epoch end rewrites the page (output.redraw every_epoch: even when epochs are
    short): it reloads itself and says which epoch; the finished page stops reloading."""
    reader = PageReader(tmp_path / "r")
    short = [*TINY[:-1], "train.epochs=2", "output.plots=false"]
    train(load_recipe("quickstart", [*short, "output.redraw=every_epoch"]), run_dir=tmp_path / "r", hooks=[reader])
    assert reader.seen == [(True, 1), (True, 2)]
    assert not parse(tmp_path / "r" / REPORT_FILE).meta_refresh
    # by default (a time budget) a run of a few seconds draws its page once, at the last epoch
    default = PageReader(tmp_path / "d")
    train(load_recipe("quickstart", short), run_dir=tmp_path / "d", hooks=[default])
    assert default.seen == [(True, 2)]


def test_report_rebuilds_from_the_run_folder(report_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(report_run.run_dir, copy)
    (copy / REPORT_FILE).unlink()
    assert main(["report", str(copy)]) == 0
    assert f"report written: {copy / REPORT_FILE}" in capsys.readouterr().out
    page = parse(copy / REPORT_FILE)
    original = parse(report_run.run_dir / REPORT_FILE)
    assert page.tables["summary-table"] == original.tables["summary-table"]
    assert page.tables["history-table"] == original.tables["history-table"]
    # per class from the best checkpoint on the validation split, as `imgtrain evaluate` measures it
    assert main(["evaluate", str(copy), "--split", "val", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    per_class = {r[0]: (float(r[1]), float(r[2]), int(r[4])) for r in page.tables["per-class-table"][1:]}
    assert per_class == {k: (pytest.approx(v["precision"], abs=1e-4), pytest.approx(v["recall"], abs=1e-4),
                             v["support"]) for k, v in metrics["per_class"].items()}
    assert len(page.tables["worst-table"]) - 1 == report_module.WORST_SHOWN


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


PROBE = """<script>
window.addEventListener('load', () => {
  const images = [...document.images];
  const tables = {};
  for (const t of document.querySelectorAll('table[id]'))
    tables[t.id] = [...t.rows].map(r => [...r.cells].map(c => c.innerText.trim()));
  // per chart: its label, its curves (plots.py gives each the gid "series-COLUMN") that the
  // browser laid out with a size, and the chart's width on the page
  const charts = [...document.querySelectorAll('svg.chart')].map(
    svg => [svg.getAttribute('aria-label'),
            [...svg.querySelectorAll('g[id^="series-"]')].filter(g => g.getBBox().width > 0).length,
            svg.getBoundingClientRect().width]);
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    sizes: images.map(i => [i.naturalWidth, i.naturalHeight]), charts, tables});
  document.body.appendChild(out);
});
</script>"""


def test_report_renders_in_a_headless_browser(report_run, tmp_path, headless_chromium):
    """The page as a browser shows it: every image decodes, the tables hold the run's numbers."""
    page = tmp_path / "probe.html"
    page.write_text((report_run.run_dir / REPORT_FILE).read_text(encoding="utf-8").replace(
        "</body>", PROBE + "</body>"), encoding="utf-8")
    dom = headless_chromium(f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                            page.as_uri())
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    probe = json.loads(html.unescape(dom[start:dom.index("</pre>", start)]))
    assert probe["images"] >= 3 and probe["loaded"] == probe["images"]
    assert all(w > 20 and h > 20 for w, h in probe["sizes"])
    # six charts laid out at their size, each with a drawn line per series (accuracy: train, val, balanced)
    assert len(probe["charts"]) == 6 and all(width > 300 for _, _, width in probe["charts"])
    lines = {label: count for label, count, _ in probe["charts"]}
    assert lines["Loss"] == 2 and lines["Accuracy"] == 3 and lines["Learning rate per optimizer step"] == 1
    assert all(count >= 1 for count in lines.values())
    summary = read_summary(report_run.run_dir)
    headline = dict(probe["tables"]["summary-table"][1:])
    assert headline["test accuracy"] == f"{summary['test_acc']:.2%}"
    assert len(probe["tables"]["per-class-table"]) == 11
    # and a screenshot, for a person to look at (kept in the test's tmp folder)
    shot = tmp_path / "report.png"
    headless_chromium(f"--user-data-dir={tmp_path / 'profile2'}", "--window-size=1280,3000", f"--screenshot={shot}",
                      (report_run.run_dir / REPORT_FILE).as_uri())
    image = Image.open(shot)
    assert image.size == (1280, 3000) and len(np.unique(np.asarray(image.convert("L")))) > 50
