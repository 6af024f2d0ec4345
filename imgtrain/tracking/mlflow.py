"""MLflow: one MLflow run per run folder, in the experiment "imgtrain", through `mlflow.MlflowClient`.

The store is `output.mlflow_uri` (a tracking server: http://host:5000), by default the SQLite file
`mlflow.db` in the folder holding the run folder (`output.root`); a SQLite store keeps the artifacts
beside its file in `mlartifacts/`. The recipe goes in as parameters (`optim.lr`, ...), each epoch's
history row as metrics at the optimizer step, images with `log_image` (keyed, per step), and
checkpoints/best.safetensors and last.safetensors as artifacts under `checkpoints/`. A resumed run
reopens the same MLflow run (its id is in the training state) and skips the steps it already holds.
View: `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imgtrain.tracking.external import TrackerBackend, TrackerRun

EXPERIMENT = "imgtrain"
MLFLOW_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MAX_PARAMS_PER_CALL = 100  # MLflow's log_batch limit
SQLITE = "sqlite:///"
STEP_PROBE_METRIC = "train_loss"  # every epoch row has it: its history says which steps a run holds


def default_tracking_uri(run_dir: Path) -> str:
    """sqlite:///<absolute path>/mlflow.db beside the run folder."""
    return f"{SQLITE}{(run_dir.parent / MLFLOW_DB).resolve()}"


class MlflowBackend(TrackerBackend):
    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.client: Any = None
        self.run_id = ""

    def open(self, run: TrackerRun) -> str:
        from mlflow import MlflowClient

        uri = self.tracking_uri or default_tracking_uri(run.run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        if run.run_id is not None:
            self.client.update_run(run.run_id, status="RUNNING")
            self.run_id = run.run_id
            return self.run_id
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        elif uri.startswith(SQLITE):  # a local store: the artifacts next to the database (not in ./mlruns)
            artifacts = Path(uri.removeprefix(SQLITE)).parent / ARTIFACTS_DIR
            experiment_id = self.client.create_experiment(EXPERIMENT, artifact_location=artifacts.resolve().as_uri())
        else:  # a server decides where artifacts go
            experiment_id = self.client.create_experiment(EXPERIMENT)
        created = self.client.create_run(experiment_id, run_name=run.name,
                                         tags={"imgtrain.run_dir": str(run.run_dir.resolve())})
        self.run_id = created.info.run_id
        return self.run_id

    def logged_through(self) -> int:
        history = self.client.get_metric_history(self.run_id, STEP_PROBE_METRIC)
        return max((metric.step for metric in history), default=-1)

    def log_params(self, params: dict[str, Any], recipe: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[start:start + MAX_PARAMS_PER_CALL])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in metrics.items()])

    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, image, key=tag.replace("/", "_"), step=step)

    def log_artifacts(self, paths: Sequence[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path="checkpoints")

    def close(self) -> None:
        if self.client is not None and self.run_id:
            self.client.set_terminated(self.run_id, status="FINISHED")
