"""Evaluation: how good a trained run is, measured offline.

- ``metrics``: Frechet distance of feature statistics, energy distance of point sets, error to the square,
  and the batched feature pass the feature networks share.
- ``inception``: the InceptionV3 network behind FID (its weights file is supplied by the user).
- ``classifier``: ddpm's own MNIST classifier, trained once and cached, for FID-MNIST.
- ``evaluate``: :func:`evaluate_run`, behind ``ddpm eval``.

The variational bound (bits/dim) is :func:`ddpm.diffusion.variational_bound`.
"""

from ddpm.evaluation.evaluate import METRICS, EvalOptions, MnistScores, default_metrics, evaluate_run, score_mnist
from ddpm.evaluation.metrics import FeatureStatistics, energy_distance, feature_statistics, frechet_distance

__all__ = ["METRICS", "EvalOptions", "default_metrics", "evaluate_run", "score_mnist", "MnistScores",
           "FeatureStatistics", "energy_distance", "feature_statistics", "frechet_distance"]
