"""Experiment trackers (TensorBoard, MLflow, W&B): what the three share.

`output.trackers: [tensorboard, mlflow, wandb]` adds one `ExperimentTracking` hook that fans out to a
`TrackerBackend` per name (tracking/tensorboard.py, tracking/mlflow.py, tracking/wandb.py). Each backend
receives the same things, with the optimizer step as the x-axis:

- at fit_start: the resolved recipe as parameters (only when the tracker run is new);
- at every epoch end: the history row (every numeric column, your `state.log_metric` ones too);
- every `output.log_images_every` epochs and at the last one: the validation confusion matrix and the
  worst-classified validation images, drawn with matplotlib and written by one background thread (a
  bounded queue), so the training thread only takes a snapshot; `state.log_image` images go the same way;
- at fit_end: checkpoints/best.safetensors and last.safetensors as artifacts (MLflow, W&B).

Resume: each backend's run id and the steps of the rows it logged live in this hook's state_dict, saved in
every training state, so a resumed run reopens the same tracker runs and logs the epochs after the
checkpoint, each step once: TensorBoard purges what a killed process wrote after the checkpoint, MLflow
skips the steps its run already holds, and W&B (whose offline file a kill can cut short) gets the rows up
to the checkpoint again unless it reports holding them. The packages are optional: `check_trackers`
turns a missing one into a RecipeError naming the extra to install, before any data is read. Under DDP
only rank 0 builds trackers (api.py).
"""

from __future__ import annotations

import importlib
import math
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgtrain.config import Recipe, RecipeError
from imgtrain.data.transforms import denormalize
from imgtrain.engine.events import Hook

TRACKERS_EXTRA = 'pip install "imgtrain[trackers]"'
# the modules each tracker imports (tried by check_trackers) and the package that provides them
TRACKER_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "tensorboard": ("tensorboard", ("tensorboard", "torch.utils.tensorboard")),
    "mlflow": ("mlflow", ("mlflow",)),
    "wandb": ("wandb", ("wandb",)),
}
WORST_LOGGED = 8        # worst-classified validation images per gallery
MAX_PENDING_IMAGES = 8  # jobs waiting for the image thread; past it state.log_image waits (bounded memory)
CONFUSION_TAG = "val/confusion_matrix"
WORST_TAG = "val/worst_images"
CHECKPOINT_ARTIFACTS = ("best.safetensors", "last.safetensors")


def check_trackers(recipe: Recipe) -> None:
    """Every tracker in `output.trackers` can be imported; else a RecipeError naming the extra to install."""
    for name in recipe.output.trackers:
        package, modules = TRACKER_MODULES[name]
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError as exc:
                raise RecipeError(f"{name} needs the {package} package, which cannot be imported ({exc}). Install "
                                  f"the tracker packages with: {TRACKERS_EXTRA} (or pip install {package}), or "
                                  f"remove {name} from the list", key="output.trackers") from None


def flat_params(recipe_dict: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"optim": {"lr": 0.1}}` -> `{"optim.lr": 0.1}`; lists and None become text (what every tracker takes)."""
    flat: dict[str, Any] = {}
    for key, value in recipe_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = "null" if value is None else str(value)
    return flat


def numeric_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a history row (the epoch too: a chart can use it); text columns are left out."""
    metrics = {}
    for key, value in row.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        metrics[str(key)] = float(value)
    return metrics


def as_rgb(image: Any) -> np.ndarray:
    """A uint8 (H, W, 3) array from what `state.log_image` takes: a matplotlib Figure (rendered here), or a
    uint8 / [0, 1] float array or tensor shaped (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 channels."""
    from matplotlib.figure import Figure

    from imgtrain.tracking.plots import figure_rgb

    if isinstance(image, Figure):
        return figure_rgb(image)
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"an image is (H, W), (H, W, C) or (C, H, W), got shape {tuple(array.shape)}")
    if array.shape[0] in (1, 3, 4) and array.shape[2] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # channels first -> last
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


class ImageWorker:
    """One background thread with a bounded queue that renders and writes images, so a tracker's matplotlib
    drawing and file writing never hold up training. Jobs run in submission order; `flush` waits for them
    and returns what failed (an image is not worth stopping a run for: the hook writes it to the log)."""

    def __init__(self, max_pending: int = MAX_PENDING_IMAGES):
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._errors: list[str] = []

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job`; waits while `max_pending` jobs are queued."""
        if self._thread is None:
            # a daemon: a run that crashes exits without waiting for its images
            self._thread = threading.Thread(target=self._run, name="imgtrain-tracker-images", daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                job()
            except Exception as exc:  # reported at the next flush
                self._errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                self._jobs.task_done()

    def flush(self) -> list[str]:
        """Wait until every queued job has run; the errors they raised since the last flush."""
        if self._thread is not None:
            self._jobs.join()
        errors, self._errors = self._errors, []
        return errors

    def close(self) -> list[str]:
        """Flush, then end the thread."""
        errors = self.flush()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        return errors


@dataclass
class TrackerRun:
    """What a backend opens its run with."""
    run_dir: Path
    name: str                        # the run folder's name: the tracker run's name
    recipe: dict[str, Any]           # the resolved recipe (nested)
    run_id: str | None               # a resumed run's id; None: start a new run
    resume_step: int | None          # a resumed run: the optimizer step it continues from


class TrackerBackend:
    """One tracker library. The hook calls every method on the training thread, except `log_image`, which
    runs on the image thread while the training thread writes nothing to this backend (it flushes first)."""

    name = "backend"

    def open(self, run: TrackerRun) -> str:
        """Start (or, with run.run_id, reopen) the tracker run; returns its id."""
        raise NotImplementedError

    def logged_through(self) -> int:
        """A reopened run: the highest optimizer step it is known to hold an epoch row for (-1: none known,
        the rows up to the checkpoint are logged again)."""
        return -1

    def log_params(self, params: dict[str, Any], recipe: dict[str, Any]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        raise NotImplementedError

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        """The checkpoints, at fit_end; TensorBoard has no artifacts."""

    def close(self) -> None:
        raise NotImplementedError


@dataclass
class EpochImages:
    """A snapshot of what an epoch's images show, taken on the training thread and drawn on the image thread."""
    epoch: int
    classes: list[str]
    confusion: list[list[int]] | None
    worst: list[np.ndarray]          # uint8 (H, W, 3)
    captions: list[str]

    def render(self) -> dict[str, np.ndarray]:
        from imgtrain.evaluation.metrics import confusion_figure
        from imgtrain.tracking.plots import figure_rgb, worst_images_figure

        images = {}
        if self.confusion is not None:
            images[CONFUSION_TAG] = figure_rgb(confusion_figure(self.confusion, self.classes,
                                                                f"validation, epoch {self.epoch}"))
        if self.worst:
            images[WORST_TAG] = figure_rgb(worst_images_figure(
                self.worst, self.captions, f"worst validation images, epoch {self.epoch} (true -> predicted)"))
        return images


def worst_images(state: Any, inputs: Any, count: int = WORST_LOGGED) -> tuple[list[np.ndarray], list[str]]:
    """The last validation's highest-loss images as uint8 (H, W, 3) arrays with "true -> predicted (p)"
    captions: a forward pass over `count` images, cheap enough for the training thread."""
    if inputs is None or getattr(inputs, "val_dataset", None) is None or not state.val_worst:
        return [], []
    chosen = state.val_worst[:count]
    items = [inputs.val_dataset[entry["index"]] for entry in chosen]
    batch = torch.stack([torch.as_tensor(image) for image, _ in items]).to(state.device)
    if inputs.eval_batch_transform is not None:
        batch = inputs.eval_batch_transform(batch)
    model = state.eval_model if state.eval_model is not None else state.model
    with torch.no_grad():
        was_training = model.training
        model.eval()
        probs = model(batch).float().softmax(dim=1).cpu()
        model.train(was_training)
    pixels = denormalize(batch, inputs.mean, inputs.std).permute(0, 2, 3, 1).numpy()
    images = [as_rgb(pixel) for pixel in pixels]
    captions = []
    for (_, target), row in zip(items, probs):
        predicted = int(row.argmax())
        captions.append(f"{state.classes[int(target)]} -> {state.classes[predicted]} ({float(row[predicted]):.2f})")
    return images, captions


class ExperimentTracking(Hook):
    """Sends the run to every backend in `backends` (see the module docstring); one hook, so the images are
    drawn once for all of them and the resume state of all of them is one entry of the training state."""

    name = "experiment_trackers"

    def __init__(self, backends: Sequence[TrackerBackend], run_dir: str | Path, log_images_every: int,
                 report_inputs: Any = None):
        self.backends = list(backends)
        self.run_dir = Path(run_dir)
        self.log_images_every = log_images_every
        self.inputs = report_inputs  # tracking.report.ReportInputs: the validation images
        self.worker = ImageWorker()
        self.run_ids: dict[str, str] = {}        # backend name -> its run id (restored on resume)
        self.last_step = -1                      # the optimizer step of the last epoch row logged
        self.row_steps: list[int] = []           # the optimizer step of each history row (to log them again)
        self._skip_through: dict[str, int] = {}  # backend name -> steps it already holds (a reopened run)
        self._state: Any = None                  # for notes from on_image

    # ------------------------------------------------------------------ the loop's events

    def fit_start(self, state: Any) -> None:
        self._state = state
        recipe = state.recipe.to_dict() if hasattr(state.recipe, "to_dict") else {}
        params = flat_params(recipe)
        resume_step = state.step if self.run_ids else None
        for backend in self.backends:
            run_id = self.run_ids.get(backend.name)
            self.run_ids[backend.name] = backend.open(TrackerRun(self.run_dir, self.run_dir.name, recipe, run_id,
                                                                 resume_step))
            if run_id is None:
                backend.log_params(params, recipe)
                self._skip_through[backend.name] = -1
            else:
                self._skip_through[backend.name] = self._catch_up(backend, state)
        if self.run_ids:
            verb = "continued" if resume_step is not None else "started"
            state.note(f"experiment trackers {verb}: " + ", ".join(f"{name} {run_id}"
                                                                   for name, run_id in self.run_ids.items()))

    def _catch_up(self, backend: TrackerBackend, state: Any) -> int:
        """A reopened run: log the epoch rows up to the checkpoint that the backend does not hold (W&B writes
        its file every few seconds, so a killed process may have lost the last ones); returns the highest
        step it holds, which the coming epochs skip (rows a killed process logged after the checkpoint)."""
        held = backend.logged_through()
        if len(self.row_steps) == len(state.history):
            for step, row in zip(self.row_steps, state.history):
                if step > held:
                    backend.log_metrics(numeric_metrics(row), step)
        return max(held, self.last_step)

    def epoch_end(self, state: Any) -> None:
        self._report(self.worker.flush())  # the last images first: a W&B step never goes back
        row = state.history[-1] if state.history else {"epoch": state.epoch + 1, **state.epoch_metrics}
        metrics = numeric_metrics(row)
        for backend in self.backends:
            if state.step > self._skip_through.get(backend.name, -1):
                backend.log_metrics(metrics, state.step)
        self.last_step = state.step
        self.row_steps.append(state.step)
        final = state.epoch + 1 >= state.epochs or state.stop_training
        every = self.log_images_every
        if every and ((state.epoch + 1) % every == 0 or final):
            worst, captions = worst_images(state, self.inputs)
            confusion = [list(r) for r in state.val_confusion] if state.val_confusion is not None else None
            snapshot = EpochImages(state.epoch + 1, list(state.classes), confusion, worst, captions)
            step = state.step  # bound now: the job runs while training goes on
            if snapshot.confusion is not None or snapshot.worst:
                self.worker.submit(lambda: self._write_images(snapshot.render(), step))

    def on_image(self, name: str, image: Any, step: int) -> None:
        if isinstance(image, torch.Tensor):  # the caller may change it in place after this returns
            image = image.detach().cpu().clone()
        elif isinstance(image, np.ndarray):
            image = image.copy()
        self.worker.submit(lambda: self._write_images({name: as_rgb(image)}, step))

    def fit_end(self, state: Any) -> None:
        self._report(self.worker.close())
        checkpoints = [self.run_dir / "checkpoints" / name for name in CHECKPOINT_ARTIFACTS]
        existing = [path for path in checkpoints if path.is_file()]
        for backend in self.backends:
            if existing:
                backend.log_artifacts(existing)
            backend.close()

    # ------------------------------------------------------------------ helpers

    def _write_images(self, images: dict[str, np.ndarray], step: int) -> None:
        for tag, image in images.items():
            for backend in self.backends:
                backend.log_image(tag, image, step)

    def _report(self, errors: list[str]) -> None:
        for error in errors:
            if self._state is not None:
                self._state.note(f"experiment trackers: an image was not logged: {error}")

    def state_dict(self) -> dict[str, Any]:
        # plain strings and ints: training states are loaded with weights_only=True
        if not self.run_ids:
            return {}
        return {"run_ids": dict(self.run_ids), "last_step": self.last_step, "row_steps": list(self.row_steps)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_ids = {str(k): str(v) for k, v in state.get("run_ids", {}).items()}
        self.last_step = int(state.get("last_step", -1))
        self.row_steps = [int(step) for step in state.get("row_steps", [])]
