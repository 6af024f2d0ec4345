"""Evaluation and prediction with trained models."""

from imgtrain.evaluation.evaluate import evaluate, evaluate_dataset
from imgtrain.evaluation.predict import collect_paths, format_predictions, predict, write_predictions

__all__ = ["evaluate", "evaluate_dataset", "collect_paths", "format_predictions", "predict", "write_predictions"]
