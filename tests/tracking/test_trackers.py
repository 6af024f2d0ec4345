"""TensorBoard, MLflow and W&B (output.trackers), read back with each library's own reader.

One tiny digits run with all three trackers is killed (SIGKILL, in a subprocess) inside its third
epoch, after the second epoch's training state, and resumed in this process. What each tracker holds
is then compared with history.csv: every epoch once, at its optimizer step, in order, with the custom
metric a user hook logs with `state.log_metric`; the same tracker runs continue (one TensorBoard folder,
one MLflow run, one W&B run id); images and checkpoints are there.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imgtrain import Hook, train
from imgtrain.config import RecipeError, load_recipe
from imgtrain.tracking import read_history
from imgtrain.tracking.external import CONFUSION_TAG, WORST_TAG, ImageWorker, as_rgb, check_trackers, flat_params
from imgtrain.tracking.history import format_value

tensorboard = pytest.importorskip("tensorboard")
mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")

REPO = Path(__file__).resolve().parents[2]
EPOCHS, STEPS = 3, 4  # optimizer steps per epoch: epoch e ends at step 4 * e
KILL_AT_STEP = 2 * STEPS + 2  # inside epoch 3, after epoch 2's training state
OVERRIDES = ["model.name=imgtrain_cnn_tiny", "augment.img_size=8", f"train.epochs={EPOCHS}",
             f"train.max_steps_per_epoch={STEPS}", "train.threads=1", "data.test_fraction=0", "output.plots=false",
             "output.report=false", "output.progress=off", "output.trackers=[tensorboard,mlflow,wandb]",
             "output.log_images_every=2"]
ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_PROJECT": "imgtrain-tests"}

# the run, killed: the same hooks as the resume below, plus a SIGKILL of its own process
KILLED_RUN = textwrap.dedent(f"""
    import os, signal, sys
    import numpy as np
    import imgtrain
    from imgtrain.config import load_recipe

    class Custom(imgtrain.Hook):
        name = "custom"
        def epoch_end(self, state):
            state.log_metric("custom_score", 10.0 + state.epoch)
            if state.epoch == 0:
                state.log_image("user/ramp", np.linspace(0, 1, 64).reshape(8, 8))

    class Kill(imgtrain.Hook):
        name = "kill"
        def after_step(self, state):
            if state.step == {KILL_AT_STEP}:
                os.kill(os.getpid(), signal.SIGKILL)

    imgtrain.train(load_recipe("quickstart", {OVERRIDES!r}), run_dir=sys.argv[1], hooks=[Custom(), Kill()])
""")


class CustomScore(Hook):
    name = "custom"

    def epoch_end(self, state: Any) -> None:
        state.log_metric("custom_score", 10.0 + state.epoch)


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trackers") / "runs" / "digits"
    env = dict(os.environ, PYTHONPATH=str(REPO), **ENV)
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(run_dir)], env=env, capture_output=True,
                            text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(read_history(run_dir / "history.csv")) == 2  # epochs 1 and 2 finished before the kill
    with pytest.MonkeyPatch.context() as patch:
        for key, value in ENV.items():
            patch.setenv(key, value)
        train(load_recipe(run_dir / "config.yaml"), resume=run_dir, hooks=[CustomScore()])
    return run_dir


def expected(run_dir: Path) -> tuple[list[int], list[dict[str, Any]]]:
    """The optimizer step of each history row, and the rows."""
    rows = read_history(run_dir / "history.csv")
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    return [STEPS * row["epoch"] for row in rows], rows


NUMERIC = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "custom_score")


def test_history_csv_has_the_custom_metric(resumed_run):
    _, rows = expected(resumed_run)
    assert [row["custom_score"] for row in rows] == [10.0, 11.0, 12.0]


# ---------------------------------------------------------------------------- TensorBoard


def test_tensorboard_scalars_match_history_once_per_step(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps, rows = expected(resumed_run)
    log_dir = resumed_run / "tensorboard"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 2  # the killed process's file, continued
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0}).Reload()
    for key in NUMERIC:
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == steps, key
        # float32 in TensorBoard, 6 significant digits in history.csv
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in rows], rel=1e-5), key
    images = events.Tags()["images"]
    assert {CONFUSION_TAG, WORST_TAG, "user/ramp"} <= set(images)
    assert [i.step for i in events.Images("user/ramp")] == [STEPS]
    for tag in (CONFUSION_TAG, WORST_TAG):  # every 2nd epoch and the last; epoch 2's unless the kill beat it
        logged = [i.step for i in events.Images(tag)]
        assert logged in ([2 * STEPS, 3 * STEPS], [3 * STEPS]), (tag, logged)


def test_tensorboard_hparams_are_in_the_same_run(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(resumed_run / "tensorboard")).Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    recipe = load_recipe(resumed_run / "config.yaml")
    assert hparams["optim.lr"].number_value == pytest.approx(recipe.optim.lr)
    assert hparams["model.name"].string_value == "imgtrain_cnn_tiny"
    assert hparams["output.trackers"].string_value == "['tensorboard', 'mlflow', 'wandb']"


# ---------------------------------------------------------------------------- MLflow


def mlflow_run(run_dir: Path) -> Any:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("imgtrain")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "the resumed process continued the killed one's MLflow run"
    return client, runs[0]


def test_mlflow_run_matches_history_once_per_step(resumed_run):
    client, run = mlflow_run(resumed_run)
    steps, rows = expected(resumed_run)
    assert run.info.run_name == "digits" and run.info.status == "FINISHED"
    for key in NUMERIC:
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == steps, key
        assert [format_value(m.value) for m in history] == [format_value(row[key]) for row in rows], key
    recipe = load_recipe(resumed_run / "config.yaml")
    assert run.data.params["optim.lr"] == str(recipe.optim.lr)
    assert run.data.params["augment.img_size"] == "8"
    assert len(run.data.params) == len(flat_params(recipe.to_dict()))


def test_mlflow_has_images_and_checkpoints(resumed_run):
    client, run = mlflow_run(resumed_run)
    run_id = run.info.run_id
    checkpoints = {Path(a.path).name: a.file_size for a in client.list_artifacts(run_id, "checkpoints")}
    for name in ("best.safetensors", "last.safetensors"):
        assert checkpoints[name] == (resumed_run / "checkpoints" / name).stat().st_size
    images = [Path(a.path).name for a in client.list_artifacts(run_id, "images")]
    final = f"+step+{3 * STEPS}+"
    for key in ("val_confusion_matrix", "val_worst_images"):
        assert any(name.startswith(key + final) and name.endswith(".png") for name in images), (key, images)
    assert any(name.startswith(f"user_ramp+step+{STEPS}+") for name in images)


# ---------------------------------------------------------------------------- W&B (offline files)


def wandb_records(path: Path) -> list[Any]:
    """The records of a .wandb transaction log: W&B's LevelDB-style log (a 7-byte header, then 32 KiB
    blocks of chunks: crc32, length, type) of `wandb_internal_pb2.Record` protobufs, W&B's own schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, position, pending = [], 7, b""
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # full, last
            records.append(wandb_internal_pb2.Record.FromString(pending + chunk))
            pending = b""
        else:  # first, middle
            pending += chunk
    return records


def wandb_offline_runs(run_dir: Path) -> list[list[Any]]:
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    return [wandb_records(next(folder.glob("run-*.wandb"))) for folder in folders]


def wandb_epoch_rows(records: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    """(step, values) of each history record that holds an epoch row, in file order."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "train_loss" in items:
                rows.append((record.history.step.num, items))
    return rows


def test_wandb_offline_history_matches_history_once_per_step(resumed_run):
    steps, rows = expected(resumed_run)
    killed, resumed = wandb_offline_runs(resumed_run)  # one offline-run folder per process
    ids = {r.run.run_id for records in (killed, resumed) for r in records if r.WhichOneof("record_type") == "run"}
    assert len(ids) == 1, f"the resumed process continues the same W&B run, got {ids}"
    # W&B writes its file every few seconds: the killed process may have lost its last rows, so the resumed
    # one logs the rows up to the checkpoint again; its file alone holds every epoch, once, in order
    logged = wandb_epoch_rows(resumed)
    assert [step for step, _ in logged] == steps
    for (_, values), row in zip(logged, rows):
        for key in NUMERIC:
            assert format_value(float(values[key])) == format_value(row[key]), key  # JSON writes 10.0 as 10
    before_kill = wandb_epoch_rows(killed)
    assert [step for step, _ in before_kill] == steps[:len(before_kill)]
    for (_, values), (_, again) in zip(before_kill, logged):
        assert values == again


def test_wandb_config_images_and_model_artifact(resumed_run):
    _, resumed = wandb_offline_runs(resumed_run)  # the killed process's file may hold nothing
    config: dict[str, Any] = {}
    for record in resumed:
        if record.WhichOneof("record_type") == "run":
            assert record.run.project == "imgtrain-tests" and record.run.display_name == "digits"
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif record.WhichOneof("record_type") == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
    recipe = load_recipe(resumed_run / "config.yaml")
    assert config["optim"]["lr"] == pytest.approx(recipe.optim.lr)
    assert config["model"]["name"] == "imgtrain_cnn_tiny"
    final_images = {item.nested_key[0] for r in resumed if r.WhichOneof("record_type") == "history"
                    and r.history.step.num == 3 * STEPS for item in r.history.item if item.nested_key}
    assert {CONFUSION_TAG, WORST_TAG} <= final_images
    image_files = list(next((resumed_run / "wandb").glob("offline-run-*")).parent.glob("*/files/media/images/**/*.png"))
    assert image_files
    artifacts = [r.artifact for r in resumed if r.WhichOneof("record_type") == "artifact"]
    assert len(artifacts) == 1 and artifacts[0].type == "model"
    assert sorted(entry.path for entry in artifacts[0].manifest.contents) == ["best.safetensors", "last.safetensors"]


# ---------------------------------------------------------------------------- resume state, missing packages


def test_tracker_run_ids_live_in_the_training_state(resumed_run):
    state = torch.load(resumed_run / "checkpoints" / "last.state.pt", weights_only=True)
    saved = state["hooks"]["experiment_trackers"]
    _, run = mlflow_run(resumed_run)
    wandb_id = sorted((resumed_run / "wandb").glob("offline-run-*"))[0].name.rsplit("-", 1)[1]
    assert saved["run_ids"] == {"tensorboard": "tensorboard", "mlflow": run.info.run_id, "wandb": wandb_id}
    assert saved["last_step"] == EPOCHS * STEPS and saved["row_steps"] == [STEPS, 2 * STEPS, 3 * STEPS]


def test_a_missing_tracker_package_is_a_recipe_error_naming_the_extra(tmp_path):
    name = "mlflow"
    # a real import failure: the package made unimportable in a fresh interpreter, not our code patched
    code = (f"import sys; sys.modules[{name!r}] = None\n"
            "from imgtrain.cli import main\n"
            f"sys.exit(main(['train', 'quickstart', 'output.trackers=[{name}]', '--run-dir', sys.argv[1]]))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert done.returncode == 2, done.stderr
    assert "output.trackers" in done.stderr and 'pip install "imgtrain[trackers]"' in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists(), "refused before the run folder is made"


def test_check_trackers_passes_when_installed():
    check_trackers(load_recipe("quickstart", ["output.trackers=[tensorboard,mlflow,wandb]"]))
    with pytest.raises(RecipeError, match="output.trackers: wandb listed more than once"):
        load_recipe("quickstart", ["output.trackers=[wandb,wandb]"])


# ---------------------------------------------------------------------------- the pieces


def test_log_metric_during_an_epoch_lands_in_that_epochs_row(tmp_path):
    class EveryStep(Hook):
        name = "every_step"

        def after_step(self, state: Any) -> None:
            state.log_metric("last_step_seen", state.step)  # the epoch's last value wins

    recipe = load_recipe("quickstart", [*OVERRIDES[:-2], "train.epochs=2"])
    result = train(recipe, run_dir=tmp_path / "run", hooks=[EveryStep()])
    assert [row["last_step_seen"] for row in read_history(tmp_path / "run" / "history.csv")] == [STEPS, 2 * STEPS]
    assert result.history[-1]["last_step_seen"] == 2 * STEPS


def test_log_metric_refuses_what_no_tracker_can_plot(tmp_path):
    from imgtrain.engine.state import TrainState

    model = torch.nn.Linear(2, 2)
    state = TrainState(recipe=None, run_dir=None, device=torch.device("cpu"), model=model,
                       optimizer=torch.optim.SGD(model.parameters(), lr=0.1), scheduler=None, scaler=None,
                       amp_dtype=None, classes=["a", "b"], epochs=1, steps_per_epoch=1)
    state.log_metric("ok", torch.tensor(0.25))
    assert state.epoch_metrics == {"ok": 0.25}
    with pytest.raises(ValueError, match="must be a number"):
        state.log_metric("text", "high")
    with pytest.raises(ValueError, match="not 'epoch'"):
        state.log_metric("epoch", 1.0)


def test_as_rgb_takes_arrays_tensors_and_figures():
    from matplotlib.figure import Figure

    gray = as_rgb(np.linspace(0, 1, 12).reshape(3, 4))
    assert gray.shape == (3, 4, 3) and gray.dtype == np.uint8 and gray[2, 3, 0] == 255 and gray[0, 0, 1] == 0
    chw = as_rgb(torch.full((3, 5, 6), 7, dtype=torch.uint8))
    assert chw.shape == (5, 6, 3) and int(chw[0, 0, 0]) == 7
    figure = Figure(figsize=(2, 1), dpi=50)
    figure.add_subplot().plot([0, 1])
    assert as_rgb(figure).shape == (50, 100, 3)
    with pytest.raises(ValueError, match="shape"):
        as_rgb(np.zeros((2, 2, 2, 2)))


def test_image_worker_runs_jobs_in_order_and_reports_failures():
    worker = ImageWorker(max_pending=2)
    done: list[int] = []
    for i in range(5):
        worker.submit(lambda i=i: done.append(i))
    worker.submit(lambda: 1 / 0)
    assert worker.flush() == ["ZeroDivisionError: division by zero"]
    assert done == [0, 1, 2, 3, 4]
    worker.submit(lambda: done.append(5))
    assert worker.close() == [] and done[-1] == 5


def test_build_trackers_adds_one_experiment_tracking_hook_last(tmp_path):
    from imgtrain.tracking import ExperimentTracking, build_trackers

    plain = build_trackers(load_recipe("quickstart", ["output.progress=off"]), tmp_path)
    assert not any(isinstance(hook, ExperimentTracking) for hook in plain)
    recipe = load_recipe("quickstart", ["output.progress=off", "output.trackers=[wandb,tensorboard]",
                                        "output.log_images_every=3"])
    hooks = build_trackers(recipe, tmp_path)
    assert len(hooks) == len(plain) + 1 and isinstance(hooks[-1], ExperimentTracking)
    assert [backend.name for backend in hooks[-1].backends] == ["wandb", "tensorboard"]
    assert hooks[-1].log_images_every == 3 and hooks[-1].state_dict() == {}  # nothing to resume before fit_start
