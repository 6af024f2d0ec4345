"""Evaluation and prediction with trained models and ensembles (see inference.py for the
predictors they share, metrics.py for the numbers, tta.py, ensemble.py and explain.py)."""

from imgtrain.evaluation.ensemble import (
                                          EnsembleOptions,
                                          EnsemblePredictor,
                                          fit_weights,
                                          load_ensemble,
                                          load_predictor,
                                          run_ensemble,
                                          save_ensemble,
)
from imgtrain.evaluation.evaluate import evaluate, evaluate_dataset, write_evaluation
from imgtrain.evaluation.inference import ImageListDataset, ModelPredictor
from imgtrain.evaluation.metrics import MetricSuite, compute_metrics, format_metrics
from imgtrain.evaluation.predict import collect_inputs, collect_paths, format_predictions, predict, write_predictions
from imgtrain.evaluation.tta import TTAConfig, TTAModel, merge_predictions, tta_config_for, tta_views

__all__ = ["EnsembleOptions", "EnsemblePredictor", "fit_weights", "load_ensemble", "run_ensemble", "save_ensemble",
           "ImageListDataset", "MetricSuite", "ModelPredictor", "collect_inputs", "collect_paths", "compute_metrics",
           "evaluate", "evaluate_dataset", "format_metrics", "format_predictions", "load_predictor", "predict",
           "write_evaluation", "write_predictions",
           "TTAConfig", "TTAModel", "merge_predictions", "tta_config_for", "tta_views"]
