"""Hyperparameter search over `api.train` with Optuna (`imgtrain tune`; the optional extra `imgtrain[tune]`).

The recipe's `search:` section says what to search (`params`, in the grammar of search_space.py), how
(`sampler`, `pruner`), for what (`metric`, `direction`) and how long each trial trains (`budget`). Every
trial is a normal run folder (`trial-0000`, `trial-0001` ...) under the study folder
(`output.root/<study name>`), with its own report; the recipe's own values are the first trial.

The study lives in an Optuna storage: by default a journal file in the study folder (no server; several
processes on one machine share it through a file lock), or any database URL (`--storage
postgresql://...`): then `imgtrain tune` processes on several machines share one study. A worker starts a
trial only while fewer than `--trials` are finished or running, so the workers together run about that
many (each may start one more in a race). A trial that crashes, or whose process was killed, is marked
FAIL and retried once with the same values; a study stopped midway continues with `--study NAME`.

Outputs, rewritten after every trial: `study.csv` (one row per trial), `best.yaml` (a complete recipe of
the best trial: `imgtrain train best.yaml` reruns it) and, at the end, `study.html` (Optuna's matplotlib
plots embedded as PNG: history, importances, parallel coordinates; the Pareto front for several metrics).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import io
import math
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgtrain.api import train
from imgtrain.config import Recipe, RecipeError, load_recipe, recipe_from_dict
from imgtrain.engine.device import select_device
from imgtrain.engine.distributed import (
    DEFAULT_TIMEOUT_SECONDS,
    barrier,
    broadcast_from_main,
    close_distributed,
    init_distributed,
    world_info,
)
from imgtrain.engine.events import Hook
from imgtrain.engine.preemption import TrainingPreempted
from imgtrain.io import RunDirError, atomic_write_bytes, atomic_write_text
from imgtrain.models import count_parameters
from imgtrain.recipe_files import read_recipe_file, set_dotted
from imgtrain.search_space import SearchParam, parse_search_param
from imgtrain.strategies.diagnostics import NonFiniteLossError

RECIPE_FILE, JOURNAL_FILE = "recipe.yaml", "study.journal"
CSV_FILE, BEST_FILE, HTML_FILE = "study.csv", "best.yaml", "study.html"
EXTRA_METRICS = ("parameters", "images_per_second")  # objectives that are not an epoch's validation number
HEARTBEAT_SECONDS = 60       # a running trial says it is alive this often (user attr `heartbeat`)
STALE_SECONDS = 600          # ... and is taken for killed when it has not for this long (another machine)
HOST = socket.gethostname()


@dataclass
class TuneOptions:
    """How `tune` runs: the study's size and time, its name and storage, processes on this machine."""
    trials: int                               # finished (complete or pruned) trials the study aims at
    timeout_minutes: float | None = None      # no new trial starts after this long (this process)
    study: str | None = None                  # default: <recipe name>-tune
    storage: str | None = None                # database URL; default: a journal file in the study folder
    jobs: int = 1                             # worker processes on this machine
    worker_index: int | None = None           # set for the workers `jobs` starts (their sampler seeds differ)
    console: Any = None                       # where progress lines go (default: stdout)


@dataclass
class StudyResult:
    study_dir: Path
    study_name: str
    metrics: list[str]
    directions: list[str]
    rows: list[dict[str, Any]]                          # study.csv's rows
    best: list[dict[str, Any]] = field(default_factory=list)  # the best row, or the Pareto front's rows
    files: list[Path] = field(default_factory=list)


class TrialFailed(Exception):
    """A trial's training raised: the trial is marked FAIL (and retried once) and the study goes on."""


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise RecipeError("imgtrain tune needs Optuna: pip install 'imgtrain[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


# ----------------------------------------------------------------------------- the search space

def search_space(recipe: Recipe) -> dict[str, SearchParam]:
    """search.params parsed (config.py checked the grammar and the keys when the recipe loaded)."""
    if not recipe.search.params:
        raise RecipeError("nothing to search: add a `search:` section with `params:`, e.g. "
                          "optim.lr: tag(log, interval(1e-4, 1e-1))", file=recipe.source_file, key="search.params")
    return {key: parse_search_param(text) for key, text in recipe.search.params.items()}


def objectives(recipe: Recipe) -> tuple[list[str], list[str]]:
    """The metric names and their directions (auto: minimize for *loss, else maximize)."""
    search = recipe.search
    metrics = list(search.metric) if isinstance(search.metric, list) else [search.metric]
    if metrics[0] == "parameters":
        raise RecipeError("parameters is a second objective (with a validation metric first, e.g. [val_acc, "
                          "parameters]): a trial's parameters do not change from epoch to epoch",
                          **_origin(recipe, "search.metric"))
    if isinstance(search.direction, list):
        return metrics, list(search.direction)
    return metrics, ["minimize" if "loss" in metrics[0] else "maximize"] if search.direction == "auto" \
        else [search.direction]


def trial_recipe(recipe: Recipe, params: dict[str, Any], search_off: bool = False) -> Recipe:
    """The recipe with a trial's values (and search.budget epochs): what that trial trains."""
    data = recipe.to_dict()
    for key, value in params.items():
        set_dotted(data, key, value)
    if recipe.search.budget is not None:
        data["train"]["epochs"] = recipe.search.budget
    if search_off:
        data.pop("search")
    built = recipe_from_dict(data)
    built.source_file = recipe.source_file
    return built


def check_space(recipe: Recipe, space: dict[str, SearchParam]) -> None:
    """Every extreme value of every parameter makes a valid recipe, checked before any trial trains: a
    `model.drop_rate: interval(0, 1.5)` is refused at its line in the recipe, not in trial 7."""
    for key, param in space.items():
        for value in param.bounds():
            try:
                trial_recipe(recipe, {key: value})
            except RecipeError as exc:
                raise RecipeError(f"{recipe.search.params[key]} reaches {value!r}, which {key} does not take "
                                  f"({exc}); narrow the range", **_origin(recipe, f"search.params.{key}")) from None


def _origin(recipe: Recipe, key: str) -> dict[str, Any]:
    """Where a search key was written: file and line when the recipe file holds it."""
    if recipe.source_file is None:
        return {"file": None, "key": key, "line": None}
    _, origins = read_recipe_file(Path(recipe.source_file))
    file, line = origins.get(key, (recipe.source_file, None))
    return {"file": file, "key": key, "line": line}


def _recipe_value(recipe: Recipe, key: str) -> Any:
    node: Any = recipe.to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def suggest(trial: Any, key: str, param: SearchParam) -> Any:
    """The trial's value of one parameter (a queued trial's own value, else the sampler's)."""
    if param.kind == "choice":
        return trial.suggest_categorical(key, list(param.choices))
    if param.kind == "int":
        return trial.suggest_int(key, int(param.low), int(param.high), step=int(param.step or 1), log=param.log)
    return trial.suggest_float(key, float(param.low), float(param.high), step=param.step, log=param.log)


# ----------------------------------------------------------------------------- study, storage, samplers

def study_folder(recipe: Recipe, name: str | None) -> tuple[Path, str]:
    """The study folder and name: `--study` as an existing folder, else output.root/<name>."""
    if name is not None and (Path(name) / RECIPE_FILE).is_file():
        return Path(name), Path(name).name
    if name is None:
        stem = Path(recipe.source_file).stem if recipe.source_file else "study"
        name = f"{stem}-tune"
    if "/" in name or name in (".", ".."):
        raise RecipeError(f"--study {name}: a study name is one folder name (or an existing study folder)",
                          file="command line")
    return Path(recipe.output.root) / name, name


def open_storage(optuna: Any, url: str | None, study_dir: Path) -> Any:
    """The journal file in the study folder by default; a database URL (postgresql://, sqlite:///) else."""
    if url is None:
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(str(study_dir / JOURNAL_FILE)))
    error: Exception | None = None
    for _ in range(3):
        try:
            return optuna.storages.RDBStorage(database_url(url))
        except Exception as exc:  # sqlalchemy's errors: a wrong URL, no server, no driver
            error = exc
            # workers starting together race to create Optuna's tables (PostgreSQL's catalog refuses the
            # second CREATE): the tables exist a moment later
            if "already exists" not in str(exc) and "duplicate key" not in str(exc):
                break
            time.sleep(1.0)
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise RecipeError(f"--storage {url}: cannot open the study database ({reason}); check the URL, that the "
                      "server runs, and for postgresql:// that psycopg2 is installed (pip install "
                      "'imgtrain[tune]')", file="command line") from None


def database_url(url: str) -> str:
    """SQLAlchemy 2.1 reads a plain postgresql:// as the psycopg (3) driver; the `tune` extra installs
    psycopg2: use it when psycopg 3 is absent. An explicit driver (postgresql+psycopg://) is kept."""
    if not url.startswith("postgresql://"):
        return url
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def build_sampler(optuna: Any, recipe: Recipe, space: dict[str, SearchParam], trials: int, seed: int) -> Any:
    name = recipe.search.sampler
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        grid = {key: param.grid() for key, param in space.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    with warnings.catch_warnings():  # Optuna's "experimental" notes: the choice is the user's, on purpose
        warnings.simplefilter("ignore")
        if name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=_startup(trials))
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, n_startup_trials=_startup(trials))
        # TPE: random trials first (a third of the study, 3 to 10), then the model of good and bad values
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=_startup(trials))


def _startup(trials: int) -> int:
    return max(3, min(10, trials // 3))


def build_pruner(optuna: Any, recipe: Recipe, epochs: int) -> Any:
    name = recipe.search.pruner
    if name == "median":  # stop a trial whose epoch is worse than the median of earlier trials' same epoch
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    # search.reduction_factor r: 2 by default. In benchmarks/tune.py (1 epoch of 4 at the first rung) a third
    # (r = 3) spent 0.52x the epochs for a best trial 0.85 points below the unpruned search, the best half
    # 0.66x and 0.70 points below (README, Hyperparameter search)
    factor = recipe.search.reduction_factor
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=factor)
    if name == "asha":  # asynchronous successive halving: keep the best 1/r at 1, r, r^2 ... epochs
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=factor)
    return optuna.pruners.NopPruner()


def _open_study(optuna: Any, recipe: Recipe, study_dir: Path, name: str, options: TuneOptions,
                space: dict[str, SearchParam], directions: list[str]) -> Any:
    """Create the study (this process then queues the recipe's own values first) or load it. Creating is
    atomic in every storage, so of several workers starting together exactly one queues them."""
    storage = open_storage(optuna, options.storage, study_dir)
    epochs = recipe.search.budget or recipe.train.epochs
    pruner = build_pruner(optuna, recipe, epochs)
    try:
        sampler = build_sampler(optuna, recipe, space, options.trials, recipe.train.seed)
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                    directions=directions)
    except optuna.exceptions.DuplicatedStudyError:
        # a worker or a resume: its own sampler seed, so two workers do not propose the same values
        offset = 1000 * options.worker_index if options.worker_index is not None else os.getpid()
        sampler = build_sampler(optuna, recipe, space, options.trials, recipe.train.seed + offset)
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
        if [d.name.lower() for d in study.directions] != directions:
            raise RecipeError(f"study {name} optimises {[d.name.lower() for d in study.directions]}, the recipe "
                              f"{directions}; use another --study", key="search.direction") from None
        return study
    own = {key: _recipe_value(recipe, key) for key in space}
    if all(param.contains(own[key]) for key, param in space.items()):
        study.enqueue_trial(own, user_attrs={"origin": "recipe"})
    else:
        outside = ", ".join(f"{k}={own[k]!r}" for k, p in space.items() if not p.contains(own[k]))
        _say(options, f"the recipe's own values are outside the search space ({outside}); every trial is sampled")
    return study


def _prepare_study_dir(recipe: Recipe, study_dir: Path) -> None:
    """Make the study folder with the recipe it searches; a folder from another recipe is refused."""
    saved = study_dir / RECIPE_FILE
    if saved.is_file():
        if load_recipe(saved).to_dict() != recipe.to_dict():
            raise RunDirError(f"{study_dir}: holds a study of another recipe ({saved}); continue it with "
                              f"`imgtrain tune --study {study_dir} --trials N`, or choose another --study")
        return
    # (a worker starting beside this one may be writing recipe.yaml's temporary file: that is ours too)
    if study_dir.exists() and any(not p.name.startswith(f".{RECIPE_FILE}.") for p in study_dir.iterdir()):
        raise RunDirError(f"{study_dir}: exists and is not a study folder of `imgtrain tune` (no {RECIPE_FILE}); "
                          "choose another "
                          "--study or empty it")
    study_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=None))


# ----------------------------------------------------------------------------- one trial

class TrialReporter(Hook):
    """Reports the metric of every epoch to the trial; stops the run at that epoch when the pruner says so
    (the run ends normally, with its report; the trial is then marked PRUNED)."""

    name = "tuning_trial"

    def __init__(self, trial: Any, metric: str, prune: bool):
        self.trial, self.metric, self.prune = trial, metric, prune
        self.values: list[float] = []
        self.pruned_at: int | None = None

    def eval_end(self, state: Any) -> None:
        if self.metric not in state.epoch_metrics:
            logged = ", ".join(k for k in state.epoch_metrics if not k.startswith("_"))
            raise RecipeError(f"{self.metric!r} is not logged by this run; it logs {logged} (and for a second "
                              "objective: parameters)", key="search.metric")
        value = float(state.epoch_metrics[self.metric])
        self.values.append(value)
        if not self.prune:
            return
        self.trial.report(value, step=state.epoch + 1)
        if self.trial.should_prune():
            self.pruned_at = state.epoch + 1
            state.stop_training = True


class _Heartbeat:
    """While a trial trains, a thread writes the time into the trial every HEARTBEAT_SECONDS: a trial that
    stopped doing so was killed (another machine's worker retries it)."""

    def __init__(self, trial: Any):
        self.trial, self.stop = trial, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception:  # a storage hiccup must not end the trial; the next beat tries again
                continue

    def __enter__(self) -> _Heartbeat:
        self.trial.set_user_attr("heartbeat", time.time())
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _retry_once(study: Any, trial: Any, reason: str) -> None:
    """Queue the failed trial's values again, once: a retry of a retry is not retried."""
    if "retry_of" in trial.user_attrs:
        return
    study.enqueue_trial(dict(trial.params), user_attrs={"retry_of": trial.number, "retry_reason": reason,
                                                        "origin": trial.user_attrs.get("origin", "sampled")})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(optuna: Any, study: Any) -> list[int]:
    """Trials left RUNNING by a killed process: on this machine its process is gone; elsewhere its heartbeat
    is older than STALE_SECONDS. Each is marked FAIL and retried once; returns their numbers."""
    stale = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        attrs = trial.user_attrs
        here = attrs.get("host") == HOST and isinstance(attrs.get("pid"), int)
        beat = attrs.get("heartbeat", attrs.get("started"))
        if (here and not _alive(attrs["pid"])) or (not here and beat is not None
                                                   and time.time() - beat > STALE_SECONDS):
            try:
                study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            except (RuntimeError, ValueError):  # another worker marked it first
                continue
            _retry_once(study, trial, "killed")
            stale.append(trial.number)
    return stale


@dataclass
class _Worker:
    """What each trial of this process needs."""
    optuna: Any
    recipe: Recipe
    space: dict[str, SearchParam]
    study_dir: Path
    metrics: list[str]
    directions: list[str]
    options: TuneOptions

    def objective(self, trial: Any) -> Any:
        optuna = self.optuna
        params = {key: suggest(trial, key, param) for key, param in self.space.items()}
        run_dir = self.study_dir / f"trial-{trial.number:04d}"
        for key, value in (("run_dir", str(run_dir)), ("host", HOST), ("pid", os.getpid()),
                           ("started", time.time())):
            trial.set_user_attr(key, value)
        recipe = trial_recipe(self.recipe, params)
        reporter = TrialReporter(trial, self.metrics[0], prune=len(self.metrics) == 1
                                 and self.recipe.search.pruner != "none")
        started = time.perf_counter()
        try:
            with _Heartbeat(trial):
                broadcast_from_main((params, str(run_dir)))  # under torchrun: every rank trains this trial
                result = train(recipe, run_dir=run_dir, hooks=[reporter])
        except (RecipeError, RunDirError):
            raise  # the user's to fix: the study stops
        except (KeyboardInterrupt, TrainingPreempted):
            trial.set_user_attr("error", "interrupted")
            _retry_once(trial.study, trial, "interrupted")
            raise
        except NonFiniteLossError as exc:  # the values made training diverge: the same again would too
            trial.set_user_attr("error", f"diverged: {exc}")
            self._record(trial, reporter, started)
            raise TrialFailed(str(exc)) from None
        except Exception as exc:
            trial.set_user_attr("error", f"crashed: {type(exc).__name__}: {exc}")
            _retry_once(trial.study, trial, "crashed")
            raise TrialFailed(str(exc)) from exc
        self._record(trial, reporter, started)
        if reporter.pruned_at is not None:
            raise optuna.TrialPruned(f"pruned after epoch {reporter.pruned_at}")
        return self._values(result, reporter)

    def _record(self, trial: Any, reporter: TrialReporter, started: float) -> None:
        trial.set_user_attr("epochs_run", len(reporter.values))
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))

    def _values(self, result: Any, reporter: TrialReporter) -> list[float]:
        """The trial's objectives: the first metric at its best epoch; a second one at that epoch, or the
        run's images/s, or the model's parameter count."""
        pick = min if self.directions[0] == "minimize" else max
        best = pick(range(len(reporter.values)), key=lambda i: reporter.values[i])
        values = [reporter.values[best]]
        for metric in self.metrics[1:]:
            if metric == "parameters":
                values.append(float(count_parameters(result.model)))
            elif metric == "images_per_second":
                values.append(float(result.summary.get("images_per_second", result.history[best][metric])))
            elif metric in result.history[best]:
                values.append(float(result.history[best][metric]))
            else:
                raise RecipeError(f"{metric!r} is not logged by this run; it logs "
                                  f"{', '.join(result.history[best])} (or parameters)", key="search.metric")
        return values

    def after_trial(self, study: Any, trial: Any) -> None:
        """Optuna's callback: say how the trial went, rewrite study.csv and best.yaml, stop at --trials."""
        self._say_trial(trial)
        fail_stale_trials(self.optuna, study)
        write_tables(study, self.recipe, self.study_dir, self.metrics, self.directions)
        if _enough(self.optuna, study, self.options.trials):
            study.stop()

    def _say_trial(self, trial: Any) -> None:
        values = ", ".join(f"{m} {v:.4g}" for m, v in zip(self.metrics, trial.values or []))
        params = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
        state = trial.state.name.lower()
        detail = values or trial.user_attrs.get("error", "")
        _say(self.options, f"trial {trial.number} {state}{': ' + detail if detail else ''} ({params}; "
                           f"{trial.user_attrs.get('epochs_run', 0)} epochs, {trial.user_attrs.get('seconds', 0)} s)")


def _enough(optuna: Any, study: Any, wanted: int) -> bool:
    """Finished plus running trials reach --trials (the running ones finish elsewhere); or more trials
    failed than were wanted (something is wrong with every trial: stop instead of looping)."""
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in (states.COMPLETE, states.PRUNED, states.RUNNING) for t in trials)
    failed = sum(t.state == states.FAIL for t in trials)
    return done >= wanted or failed > wanted


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _say(options: TuneOptions, line: str) -> None:
    print(f"imgtrain tune: {line}", file=options.console or sys.stdout, flush=True)


# ----------------------------------------------------------------------------- the study

def tune(recipe: Recipe, options: TuneOptions) -> StudyResult:
    """Run (or continue) the study of `recipe`'s search section until `options.trials` trials are finished;
    write study.csv, best.yaml and study.html in the study folder and return what they hold."""
    optuna = _optuna()
    space = search_space(recipe)
    metrics, directions = objectives(recipe)
    check_space(recipe, space)
    rank, world_size, _ = world_info()
    if world_size > 1:  # torchrun: each trial is one DDP job of all the processes
        return _tune_distributed(recipe, options, rank)
    return _tune(optuna, recipe, options, space, metrics, directions)


def _tune_distributed(recipe: Recipe, options: TuneOptions, rank: int) -> StudyResult:
    """Under torchrun rank 0 runs the study and sends each trial's values to the other ranks, which train
    it with it (DDP; the pruner's stop reaches every rank through the loop's agreed stop_training);
    `None` ends them. Only rank 0 writes the study folder and the trials' run folders."""
    init_distributed(select_device(recipe.train.device), DEFAULT_TIMEOUT_SECONDS)
    metrics, directions = objectives(recipe)
    # a rank that fails ends the job (torchrun stops the others); `--study NAME` continues the study then
    if rank == 0:
        result = _tune(_optuna(), recipe, options, search_space(recipe), metrics, directions)
        broadcast_from_main(None)
    else:
        result = StudyResult(Path(), options.study or "", metrics, directions, rows=[])
        while (work := broadcast_from_main(None)) is not None:
            params, run_dir = work
            train(trial_recipe(recipe, params), run_dir=run_dir)
    barrier()
    close_distributed()
    return result


def _tune(optuna: Any, recipe: Recipe, options: TuneOptions, space: dict[str, SearchParam], metrics: list[str],
          directions: list[str]) -> StudyResult:
    study_dir, name = study_folder(recipe, options.study)
    _prepare_study_dir(recipe, study_dir)
    study = _open_study(optuna, recipe, study_dir, name, options, space, directions)
    worker = _Worker(optuna, recipe, space, study_dir, metrics, directions, options)
    for number in fail_stale_trials(optuna, study):
        _say(options, f"trial {number} was killed; marked failed and queued again")
    if options.jobs > 1:
        _run_worker_processes(study_dir, options)
    elif not _enough(optuna, study, options.trials):
        timeout = options.timeout_minutes * 60 if options.timeout_minutes else None
        study.optimize(worker.objective, timeout=timeout, catch=(TrialFailed,), callbacks=[worker.after_trial],
                       gc_after_trial=True)
    rows = write_tables(study, recipe, study_dir, metrics, directions)
    files = [study_dir / CSV_FILE]
    if (study_dir / BEST_FILE).is_file():
        files.append(study_dir / BEST_FILE)
    if options.worker_index is None:  # the workers `--jobs` starts leave the page to the process that waits
        files.append(write_study_html(optuna, study, study_dir, name, metrics, rows))
    return StudyResult(study_dir, name, metrics, directions, rows, best=best_rows(study, rows), files=files)


def _run_worker_processes(study_dir: Path, options: TuneOptions) -> None:
    """`--jobs J`: J processes of `imgtrain tune --study DIR` on the same storage (threads would share
    torch's global seeds and thread pool); this process waits for them."""
    command = [sys.executable, "-m", "imgtrain", "tune", "--study", str(study_dir), "--trials", str(options.trials)]
    if options.storage:
        command += ["--storage", options.storage]
    if options.timeout_minutes:
        command += ["--timeout", str(options.timeout_minutes)]
    workers = [subprocess.Popen([*command, "--worker-index", str(index)]) for index in range(options.jobs)]
    codes = [worker.wait() for worker in workers]
    if any(codes):
        raise RunDirError(f"{sum(1 for c in codes if c)} of {len(codes)} tune workers failed (exit codes "
                          f"{codes}); their messages are above. Continue with `imgtrain tune --study {study_dir} "
                          f"--trials {options.trials}`")


# ----------------------------------------------------------------------------- outputs

def study_rows(study: Any, metrics: list[str]) -> list[dict[str, Any]]:
    """study.csv's rows: trial, state, metric(s), parameters, epochs run, seconds, run folder, note."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"]: t.number for t in trials if "retry_of" in t.user_attrs}
    rows = []
    for t in trials:
        row: dict[str, Any] = {"trial": t.number, "state": t.state.name}
        for index, metric in enumerate(metrics):
            row[metric] = t.values[index] if t.values is not None else None
        if t.values is None and t.intermediate_values:  # a pruned trial: its last epoch's number
            row[metrics[0]] = t.intermediate_values[max(t.intermediate_values)]
        row.update({f"params.{k}": v for k, v in t.params.items()})
        row["epochs_run"] = t.user_attrs.get("epochs_run")
        row["seconds"] = t.user_attrs.get("seconds")
        row["run_dir"] = t.user_attrs.get("run_dir")
        row["host"] = t.user_attrs.get("host")
        notes = []
        if t.user_attrs.get("origin") == "recipe":
            notes.append("the recipe's own values")
        if "retry_of" in t.user_attrs:
            notes.append(f"retry of trial {t.user_attrs['retry_of']} ({t.user_attrs.get('retry_reason')})")
        if t.state.name == "PRUNED":
            notes.append(f"pruned after epoch {t.user_attrs.get('epochs_run')}")
        if t.state.name == "FAIL":
            notes.append(t.user_attrs.get("error", "killed"))
        if t.number in retried:
            notes.append(f"retried as trial {retried[t.number]}")
        row["note"] = "; ".join(notes)
        rows.append(row)
    return rows


def best_rows(study: Any, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The best trial's row (one metric) or the Pareto front's rows (several); [] before any completes."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if not complete:
        return []
    best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    numbers = {t.number for t in best}
    return [row for row in rows if row["trial"] in numbers]


def write_tables(study: Any, recipe: Recipe, study_dir: Path, metrics: list[str],
                 directions: list[str]) -> list[dict[str, Any]]:
    """study.csv, and best.yaml once a trial completed (several metrics: the front's best on the first)."""
    rows = study_rows(study, metrics)
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["trial", "state", *metrics]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(study_dir / CSV_FILE, buffer.getvalue())
    best = best_rows(study, rows)
    if best:
        pick = min if directions[0] == "minimize" else max
        chosen = pick(best, key=lambda row: row[metrics[0]])
        params = {key[len("params."):]: value for key, value in chosen.items() if key.startswith("params.")}
        best_recipe = trial_recipe(recipe, params, search_off=True)
        best_recipe = dataclasses.replace(best_recipe, output=dataclasses.replace(
            best_recipe.output, name=f"{study_dir.name}-best"))
        header = (f"# The best trial ({chosen['trial']}: {metrics[0]} {chosen[metrics[0]]:.4g}) of the study in "
                  f"{study_dir}.\n# Rerun it: imgtrain train {study_dir / BEST_FILE}\n")
        data = best_recipe.to_dict()
        data.pop("search", None)
        atomic_write_text(study_dir / BEST_FILE, header + yaml.safe_dump(data, sort_keys=False,
                                                                          default_flow_style=None))
    return rows


def _figure_png(draw: Callable[[], Any]) -> bytes | None:
    """One of Optuna's matplotlib plots as PNG bytes, or None when the study cannot draw it yet (fANOVA
    importances need two completed trials and a parameter that varied)."""
    import matplotlib.pyplot as plt
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" notes
            axes = draw()
    except (ValueError, RuntimeError, ZeroDivisionError, IndexError):
        plt.close("all")
        return None
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    figure = first.figure
    figure.set_size_inches(9, 5)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


STUDY_CSS = ("body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 7px;text-align:right}th{background:#f3f3f3}figure{margin:1.5em 0}"
             "img{max-width:100%;border:1px solid #eee}.missing{color:#777}")


def write_study_html(optuna: Any, study: Any, study_dir: Path, name: str, metrics: list[str],
                     rows: list[dict[str, Any]]) -> Path:
    """study.html: self-contained (PNGs as data URIs) history, importances, parallel coordinates (and the
    Pareto front, or the pruned trials' curves), the best trial(s) and every trial's row."""
    import matplotlib
    matplotlib.use("Agg")  # no display: the page is drawn to files
    plots = optuna.visualization.matplotlib
    several = len(metrics) > 1
    target = (lambda t: t.values[0]) if several else None
    charts: list[tuple[str, Callable[[], Any]]] = [
        ("Optimisation history", lambda: plots.plot_optimization_history(study, target=target,
                                                                         target_name=metrics[0])),
        ("Parameter importances", lambda: plots.plot_param_importances(study, target=target,
                                                                       target_name=metrics[0])),
        ("Parallel coordinates", lambda: plots.plot_parallel_coordinate(study, target=target,
                                                                        target_name=metrics[0])),
    ]
    if several:
        charts.append(("Pareto front", lambda: plots.plot_pareto_front(study, target_names=metrics)))
    elif any(row["state"] == "PRUNED" for row in rows):
        charts.append(("Metric per epoch (pruned trials end early)", lambda: plots.plot_intermediate_values(study)))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>study {html.escape(name)}</title>"
             f"<style>{STUDY_CSS}</style></head><body><h1>Study {html.escape(name)}</h1>"]
    best = best_rows(study, rows)
    label = "Pareto front" if several else "Best trial"
    parts.append(f"<h2>{label}</h2>" + (_html_table(best, "best-table") if best else
                                         "<p class='missing'>no trial has completed yet</p>"))
    for title, draw in charts:
        png = _figure_png(draw)
        parts.append(f"<figure><figcaption><h2>{html.escape(title)}</h2></figcaption>")
        if png is None:
            parts.append("<p class='missing'>not enough completed trials to draw it yet</p></figure>")
        else:
            encoded = base64.b64encode(png).decode("ascii")
            parts.append(f"<img class='chart' alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>"
                         "</figure>")
    parts.append("<h2>Trials</h2>" + _html_table(rows, "trials-table") + "</body></html>")
    path = study_dir / HTML_FILE
    atomic_write_bytes(path, "".join(parts).encode("utf-8"))
    return path


def _html_table(rows: list[dict[str, Any]], table_id: str) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c)))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f"<table id='{table_id}'><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
