"""`imgtrain tune`: real studies on digits (a tiny CNN, 8 px, one or two epochs per trial): the recipe's own
values first, pruning with run folders of their own, crashed and killed trials retried once, a killed
study continued, several objectives with their Pareto front, the outputs (study.csv, best.yaml that
`imgtrain train` reruns, study.html in a headless browser), and one study shared by two processes
through a real PostgreSQL server."""

from __future__ import annotations

import csv
import html
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

import imgtrain.tuning as tuning
from imgtrain.api import train
from imgtrain.cli import main
from imgtrain.config import RecipeError, load_recipe
from imgtrain.tracking import read_history
from imgtrain.tuning import TuneOptions, tune

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PG_BIN = next((p for p in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True) if (p / "initdb").is_file()),
              Path(shutil.which("initdb")).parent if shutil.which("initdb") else None)

SMALL = """extends: quickstart
data:
  train_subset: 300
  test_fraction: 0.0
augment:
  img_size: 8
model:
  name: imgtrain_cnn_tiny
train:
  epochs: {epochs}
  threads: 1
output:
  root: {root}
  progress: off
  plots: false
search:
{search}
"""


def write_recipe(folder: Path, search: str, epochs: int = 2, name: str = "small") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(SMALL.format(epochs=epochs, root=folder / "runs", search=search), encoding="utf-8")
    return path


LR_AND_BATCH = """  sampler: random
  params:
    optim.lr: tag(log, interval(1e-3, 0.5))
    data.batch_size: choice(32, 64, 128)
"""


def read_rows(study_dir: Path) -> list[dict[str, str]]:
    with open(study_dir / "study.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A 4-trial random-search study of lr and batch size, 2 epochs each."""
    folder = tmp_path_factory.mktemp("tune")
    recipe = load_recipe(write_recipe(folder, LR_AND_BATCH))
    return recipe, tune(recipe, TuneOptions(trials=4, console=open(os.devnull, "w")))


def test_a_study_runs_the_recipe_values_first_and_writes_one_row_per_trial(study):
    recipe, result = study
    assert result.study_dir == Path(recipe.output.root) / "small-tune"
    rows = read_rows(result.study_dir)
    assert [row["trial"] for row in rows] == ["0", "1", "2", "3"] and {row["state"] for row in rows} == {"COMPLETE"}
    first = rows[0]
    assert float(first["params.optim.lr"]) == 0.1 and first["params.data.batch_size"] == "64"  # quickstart's
    assert "the recipe's own values" in first["note"]
    # the sampled values lie in the space, and differ from trial to trial
    lrs = [float(row["params.optim.lr"]) for row in rows]
    assert all(1e-3 <= lr <= 0.5 for lr in lrs) and len(set(lrs)) == 4
    assert {row["params.data.batch_size"] for row in rows} <= {"32", "64", "128"}
    for row in rows:  # each trial is a normal run folder whose best epoch is the trial's metric
        history = read_history(Path(row["run_dir"]) / "history.csv")
        assert int(row["epochs_run"]) == len(history) == 2 and float(row["seconds"]) > 0
        assert float(row["val_acc"]) == pytest.approx(max(h["val_acc"] for h in history))
        assert (Path(row["run_dir"]) / "report.html").is_file()
    best = max(rows, key=lambda row: float(row["val_acc"]))
    assert [row["trial"] for row in result.best] == [int(best["trial"])]


def test_best_yaml_is_a_recipe_that_reruns_the_best_trial(study):
    _, result = study
    best = result.best[0]
    best_yaml = result.study_dir / "best.yaml"
    recipe = load_recipe(best_yaml)
    assert recipe.optim.lr == best["params.optim.lr"] and recipe.data.batch_size == best["params.data.batch_size"]
    assert recipe.search.params == {} and recipe.output.name == "small-tune-best"
    trial_config = yaml.safe_load((Path(best["run_dir"]) / "config.yaml").read_text())
    assert {k: v for k, v in recipe.to_dict().items() if k not in ("output", "search")} == \
        {k: v for k, v in trial_config.items() if k not in ("output", "search")}
    rerun = train(recipe)  # same values, same seed: the same numbers on the CPU
    assert max(h["val_acc"] for h in rerun.history) == pytest.approx(best["val_acc"])
    assert rerun.run_dir == Path(recipe.output.root) / "small-tune-best"


def test_study_html_holds_the_plots_and_the_trials(study):
    _, result = study
    page = (result.study_dir / "study.html").read_text(encoding="utf-8")
    for title in ("Optimisation history", "Parameter importances", "Parallel coordinates"):
        assert f"alt='{title}' src='data:image/png;base64," in page
    assert page.count("<tr>") == 1 + 4 + 1 + 1  # trials table (header + 4) and best table (header + 1)
    assert "http://" not in page and "https://" not in page  # self-contained


PROBE = """<pre id="probe"></pre><script>
window.addEventListener('load', () => {
  const images = [...document.querySelectorAll('img')];
  const rows = [...document.querySelectorAll('#trials-table tr')].map(r => [...r.cells].map(c => c.textContent));
  document.getElementById('probe').textContent = JSON.stringify({images: images.length,
    loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    sizes: images.map(i => [i.naturalWidth, i.naturalHeight]), rows});
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_study_html_renders_in_a_headless_browser(study, tmp_path):
    _, result = study
    page = tmp_path / "probe.html"
    page.write_text((result.study_dir / "study.html").read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                    encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000", "--dump-dom"]
    done = subprocess.run([CHROMIUM, *flags, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    probe = json.loads(html.unescape(dom[start:dom.index("</pre>", start)]))
    assert probe["images"] == 3 and probe["loaded"] == 3
    assert all(width >= 400 and height >= 200 for width, height in probe["sizes"])
    header, *rows = probe["rows"]
    assert header[:3] == ["trial", "state", "val_acc"] and len(rows) == 4
    assert [f"{float(r['val_acc']):.4g}" for r in read_rows(result.study_dir)] == [row[2] for row in rows]


def test_asha_prunes_trials_that_end_as_runs_with_their_own_report(tmp_path):
    search = """  sampler: random
  pruner: asha
  params:
    optim.lr: tag(log, interval(1e-4, 0.2))
"""
    recipe = load_recipe(write_recipe(tmp_path, search, epochs=3))
    result = tune(recipe, TuneOptions(trials=5, console=open(os.devnull, "w")))
    rows = read_rows(result.study_dir)
    pruned = [row for row in rows if row["state"] == "PRUNED"]
    assert len(rows) == 5 and pruned and rows[0]["state"] == "COMPLETE"  # the recipe's lr 0.1 is the best
    for row in pruned:
        epochs = int(row["epochs_run"])
        assert epochs < 3 and f"pruned after epoch {epochs}" in row["note"]
        assert len(read_history(Path(row["run_dir"]) / "history.csv")) == epochs
        assert (Path(row["run_dir"]) / "report.html").is_file()
        assert float(row["val_acc"]) == read_history(Path(row["run_dir"]) / "history.csv")[-1]["val_acc"]
    assert "Metric per epoch" in (result.study_dir / "study.html").read_text()


@pytest.mark.parametrize("factor, kept", [(2, True), (3, False)])
def test_asha_keeps_the_best_one_in_reduction_factor_of_the_trials_at_a_rung(tmp_path, factor, kept):
    import optuna
    search = f"""  pruner: asha
  reduction_factor: {factor}
  params:
    optim.lr: interval(0.01, 0.1)
"""
    recipe = load_recipe(write_recipe(tmp_path, search, epochs=4))
    study = optuna.create_study(direction="maximize", pruner=tuning.build_pruner(optuna, recipe, 4))
    for value in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):  # six trials reached the first rung (epoch 1)
        trial = study.ask()
        trial.report(value, 1)
        trial.should_prune()
        study.tell(trial, value)
    trial = study.ask()
    trial.report(0.45, 1)  # third of seven: in the best half, not in the best third
    assert trial.should_prune() is not kept


def test_a_crashed_trial_is_marked_and_retried_once(tmp_path, monkeypatch):
    real_train, calls = tuning.train, []

    def crashes_twice(recipe, **kwargs):
        calls.append(recipe.optim.lr)
        if len(calls) <= 2:
            raise RuntimeError("simulated out of memory")
        return real_train(recipe, **kwargs)

    monkeypatch.setattr(tuning, "train", crashes_twice)
    recipe = load_recipe(write_recipe(tmp_path, LR_AND_BATCH, epochs=1))
    tune(recipe, TuneOptions(trials=2, console=open(os.devnull, "w")))
    rows = read_rows(Path(recipe.output.root) / "small-tune")
    assert [row["state"] for row in rows] == ["FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert "crashed: RuntimeError: simulated out of memory" in rows[0]["note"]
    assert "retried as trial 1" in rows[0]["note"] and "retry of trial 0 (crashed)" in rows[1]["note"]
    assert calls[0] == calls[1] == 0.1  # the retry ran the same values; a retry of a retry is not retried
    assert "retried as" not in rows[1]["note"] and rows[2]["params.optim.lr"] != rows[0]["params.optim.lr"]


def test_a_killed_study_continues_and_retries_the_killed_trial(tmp_path, capsys, monkeypatch):
    recipe_path = write_recipe(tmp_path, LR_AND_BATCH, epochs=2)
    study_dir = tmp_path / "runs" / "small-tune"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "imgtrain", "tune", str(recipe_path), "--trials", "3"],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (study_dir / "trial-0001" / "config.yaml").is_file() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # mid trial 1: no handler runs, the trial stays RUNNING
    process.wait()
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "--study", str(study_dir), "--trials", "3"]) == 0
    out = capsys.readouterr().out
    assert "trial 1 was killed; marked failed and queued again" in out
    rows = read_rows(study_dir)
    states = [row["state"] for row in rows]
    assert states[:3] == ["COMPLETE", "FAIL", "COMPLETE"] and states.count("COMPLETE") == 3
    assert rows[1]["note"] == "killed; retried as trial 2" and rows[2]["note"] == "retry of trial 1 (killed)"
    assert rows[2]["params.optim.lr"] == rows[1]["params.optim.lr"]
    assert "best: trial" in out and (study_dir / "study.html").is_file()


def test_several_objectives_report_the_pareto_front(tmp_path):
    search = """  sampler: random
  metric: [val_acc, parameters]
  direction: [maximize, minimize]
  params:
    model.name: choice(imgtrain_cnn_tiny, imgtrain_cnn_small)
    optim.lr: tag(log, interval(1e-2, 0.3))
"""
    recipe = load_recipe(write_recipe(tmp_path, search, epochs=1))
    result = tune(recipe, TuneOptions(trials=4, console=open(os.devnull, "w")))
    rows = read_rows(result.study_dir)
    assert len(rows) == 4 and all(row["state"] == "COMPLETE" for row in rows)
    front = result.best
    # no row of the front is beaten on both objectives by another trial
    for row in front:
        assert not any(float(other["val_acc"]) >= row["val_acc"] and float(other["parameters"]) <= row["parameters"]
                       and (float(other["val_acc"]), float(other["parameters"])) != (row["val_acc"], row["parameters"])
                       for other in rows)
    sizes = {(row["params.model.name"], float(row["parameters"])) for row in rows}
    assert len(sizes) == len({name for name, _ in sizes})  # the parameter count is the model's
    assert "alt='Pareto front'" in (result.study_dir / "study.html").read_text()


def test_out_of_range_search_space_is_refused_at_its_line(tmp_path):
    search = "  params:\n    model.drop_rate: interval(0, 1.5)\n"
    recipe = load_recipe(write_recipe(tmp_path, search))
    with pytest.raises(RecipeError) as caught:
        tune(recipe, TuneOptions(trials=2))
    assert caught.value.line == 18 and caught.value.key == "search.params.model.drop_rate"
    assert "reaches 1.5" in str(caught.value) and "narrow the range" in str(caught.value)
    assert not (tmp_path / "runs").exists()  # nothing written before the checks


def test_cli_errors_are_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "quickstart", "--trials", "2"]) == 2
    assert "nothing to search: add a `search:` section" in capsys.readouterr().err
    recipe = write_recipe(tmp_path, LR_AND_BATCH)
    assert main(["tune", str(recipe), "--trials", "2", "--storage", "postgresql://nobody@127.0.0.1:1/none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgtrain: error: command line: --storage postgresql://") and "cannot open" in err
    assert main(["tune", "--study", "missing", "--trials", "2"]) == 2
    assert "no study there" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server in a temporary folder on a free port (as the postgres user when root:
    initdb refuses root), stopped and deleted afterwards."""
    if PG_BIN is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): .ci/run installs Debian's postgresql")
    folder = Path(tempfile.mkdtemp(prefix="imgtrain-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = folder / "data"
    subprocess.run([*as_user, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8"], check=True, capture_output=True, timeout=120)
    subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_processes_share_one_study_on_postgresql(tmp_path, postgres_url):
    recipe = write_recipe(tmp_path, LR_AND_BATCH, epochs=1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "imgtrain", "tune", str(recipe), "--trials", "4", "--study", "shared",
               "--storage", postgres_url]
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=300) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    import optuna
    trials = optuna.load_study(study_name="shared", storage=tuning.database_url(postgres_url)).get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and all(t.state.name == "COMPLETE" for t in trials)
    assert 4 <= len(trials) <= 5  # each worker stops at 4 finished or running (a race may start one more)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both processes trained trials
    # no trial ran twice: one run folder per trial, each trained once (one epoch, one history row)
    run_dirs = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert len(set(run_dirs)) == len(trials)
    assert all(len(read_history(tmp_path / run_dir / "history.csv")) == 1 for run_dir in run_dirs)
    assert sum("the recipe's own values" in row["note"] for row in read_rows(tmp_path / "runs" / "shared")) == 1


def _journal_trials(study_dir: Path, name: str) -> list:
    import optuna
    return optuna.load_study(study_name=name, storage=tuning.open_storage(optuna, None, study_dir)).get_trials()


def test_jobs_runs_worker_processes_on_one_study(tmp_path, capsys):
    """`--jobs 2`: two `imgtrain tune` processes on the study's journal, no trial run twice; the waiting
    process writes study.csv, best.yaml and study.html."""
    recipe = write_recipe(tmp_path, LR_AND_BATCH, epochs=1)
    assert main(["tune", str(recipe), "--trials", "4", "--study", "jobs", "--jobs", "2"]) == 0
    study_dir = tmp_path / "runs" / "jobs"
    trials = _journal_trials(study_dir, "jobs")
    assert 4 <= len(trials) <= 5 and all(t.state.name == "COMPLETE" for t in trials)
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids  # both workers trained, this process only waited
    run_dirs = [Path(t.user_attrs["run_dir"]) for t in trials]
    assert len(set(run_dirs)) == len(trials)
    assert all(len(read_history(run_dir / "history.csv")) == 1 for run_dir in run_dirs)  # each trained once
    rows = read_rows(study_dir)
    assert sorted(int(r["trial"]) for r in rows) == sorted(t.number for t in trials)
    assert sum("the recipe's own values" in row["note"] for row in rows) == 1
    assert (study_dir / "best.yaml").is_file() and (study_dir / "study.html").is_file()
    assert f"study jobs: {len(trials)} finished trial(s)" in capsys.readouterr().out


def test_each_trial_is_one_ddp_job_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m imgtrain tune`: rank 0 runs the study, both ranks train each trial
    (gloo), only rank 0 writes; a trial equals one process at the same global batch."""
    exact = "model:\n  name: imgtrain_cnn_tiny\n  drop_rate: 0\n  kwargs: {norm: group}\n"
    recipe = write_recipe(tmp_path, "  sampler: random\n  params:\n    optim.lr: choice(0.1, 0.05)\n", epochs=2)
    recipe.write_text(recipe.read_text().replace("model:\n  name: imgtrain_cnn_tiny\n", exact)
                      .replace("augment:\n  img_size: 8\n", "augment:\n  img_size: 8\n  pad_crop: 0\n"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(_free_port()), "-m", "imgtrain", "tune", str(recipe),
                           "data.batch_size=32", "--trials", "2", "--study", "ddp"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    study_dir = tmp_path / "runs" / "ddp"
    trials = _journal_trials(study_dir, "ddp")
    assert len(trials) == 2 and all(t.state.name == "COMPLETE" for t in trials)
    assert done.stdout.count("study ddp: 2 finished trial(s)") == 1  # rank 0 alone reports
    first = study_dir / "trial-0000"
    assert json.loads((first / "run.json").read_text())["lr_scaling"]["processes"] == 2
    # the same trial in one process with the global batch (2 x 32): the same numbers
    single = train(load_recipe(recipe, ["data.batch_size=64", "search.params={}", "output.plots=false"]),
                   run_dir=tmp_path / "single")
    ddp_history = read_history(first / "history.csv")
    assert len(ddp_history) == len(single.history) == 2
    for ours, theirs in zip(ddp_history, single.history):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-4)
        assert ours["val_acc"] == pytest.approx(theirs["val_acc"], abs=1e-4)

