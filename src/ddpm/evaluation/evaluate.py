"""``ddpm eval``: the metrics of a trained run, from samples it draws and data it holds out.

    run = ddpm.load("runs/mnist")
    report = evaluate_run(run, ["fid-mnist", "bpd"], EvalOptions(num=1000))
    report["fid-mnist"]["fid"], report["bpd"]["bpd"]

Each metric is a function of an :class:`_Evaluation`, which draws the run's samples once (shared by
every sample-based metric) and loads the reference data once. Metrics return flat dicts of numbers
(and short lists), ready for JSON.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ddpm.catalog import METRICS
from ddpm.config import SampleConfig
from ddpm.data import NoSplitsError, load_dataset
from ddpm.data.registry import DATASETS, MNIST_CLASSES, Dataset, is_generated
from ddpm.diffusion import variational_bound
from ddpm.evaluation.metrics import energy_distance, feature_statistics, frechet_distance, square_error
from ddpm.run import Run

__all__ = ["METRICS", "EvalOptions", "default_metrics", "evaluate_run", "score_mnist", "MnistScores"]

@dataclass(frozen=True)
class EvalOptions:
    """How ``ddpm eval`` samples and what it compares against."""

    num: int = 1000  # samples to draw for the sample-based metrics
    heldout: int = 100  # held-out examples for bpd (each costs T network calls)
    sample: SampleConfig | None = None  # how samples are drawn; None: the run's (Run.sample_options())
    batch_size: int = 250
    seed: int = 0
    bound_variance: str = "fixed_large"  # sigma_t^2 of the bound's reverse steps (see diffusion.variational_bound)
    data_dir: str | None = None  # where MNIST / CIFAR-10 are, if not where the run was trained
    inception_weights: str | None = None
    progress: bool = True


def default_metrics(run: Run) -> list[str]:
    """The metrics that suit a run's data: every run gets bpd, plus the one its data calls for."""
    name = _source_name(run)
    if run.kind == "points":
        return ["energy", "bpd"]
    special = {"mnist": "fid-mnist", "gradients": "gradient", "square": "square"}.get(name)
    return [special, "bpd"] if special else ["bpd"]


def _source_name(run: Run) -> str:
    source = run.config.data.source
    if source in ("mnist", "cifar10", "square", "gradients"):
        return source
    path = Path(source).expanduser()
    from ddpm.data.mnist import find_mnist_files

    if path.is_dir() and find_mnist_files(path, "test") is not None:
        return "mnist"
    return source


def evaluate_run(run: Run, metrics: list[str], options: EvalOptions = EvalOptions()) -> dict[str, dict[str, Any]]:
    """Compute each named metric of ``run``; returns {metric: {quantity: value}}."""
    evaluation = check_metrics(run, metrics, options)
    return {metric: _METRIC_FUNCTIONS[metric](evaluation) for metric in metrics}


def check_metrics(run: Run, metrics: list[str], options: EvalOptions = EvalOptions()) -> _Evaluation:
    """Refuse, before any expensive work, a metric that is unknown or that this run cannot have."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; allowed: {', '.join(METRICS)}")
    evaluation = _Evaluation(run, options)
    for metric in metrics:
        evaluation.check(metric)
    return evaluation


class _Evaluation:
    """A run, the options, and the samples and data that metrics share (each made once, when first used)."""

    def __init__(self, run: Run, options: EvalOptions):
        self.run, self.options = run, options
        self.source = _source_name(run)

    def check(self, metric: str) -> None:
        """Refuse, before any expensive work, a metric this run's data cannot have."""
        needs = {"gradient": "gradients", "square": "square", "fid-mnist": "mnist"}  # the data each is made for
        if metric == "energy" and self.run.kind != "points":
            raise ValueError("the energy metric compares point sets; this run's data are images")
        if metric == "energy" and self.options.num < 2:
            raise ValueError(f"the energy metric needs at least 2 samples; got --num {self.options.num}")
        if metric in needs and self.source != needs[metric]:
            raise ValueError(f"the {metric} metric needs a run trained on {needs[metric]}; this run's data is "
                             f"{self.run.config.data.source!r}")
        if metric == "fid-mnist" and tuple(self.run.sample_shape) != (1, 28, 28):
            raise ValueError(f"fid-mnist needs 1x28x28 samples, as the classifier reads; this run makes "
                             f"{'x'.join(map(str, self.run.sample_shape))}")
        if metric == "fid" and self.run.kind != "image":
            raise ValueError("fid compares images; for point data use the energy metric")
        if metric == "fid":
            from ddpm.evaluation.inception import inception_weights_path

            inception_weights_path(self.options.inception_weights)  # a one-line error if it is missing

    def reference(self, n: int) -> Dataset:
        """``n`` held-out examples (fewer if the data has fewer) in the run's data shape: the test split
        where the data has one (a fresh draw for generated sets), else the training data itself."""
        d = self.run.config.data
        seed = self.options.seed + 1
        common = dict(image_size=d.image_size, channels=d.channels, data_dir=self.data_dir)
        generated = is_generated(d.source)
        try:
            data = load_dataset(d.source, split="test", n=n if generated else None, seed=seed, **common)
        except NoSplitsError:
            data = load_dataset(d.source, seed=seed, **common)
        if len(data) <= n:
            return data
        chosen = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
        return data.subset(chosen)

    @property
    def data_dir(self) -> str | None:
        """Where MNIST / CIFAR-10 files are: the option, else the run's data_dir, else its source path."""
        d = self.run.config.data
        if self.options.data_dir or d.data_dir:
            return self.options.data_dir or d.data_dir
        return None if d.source in DATASETS else d.source

    @cached_property
    def sample_options(self) -> SampleConfig:
        return self.options.sample or self.run.sample_options()

    @cached_property
    def labels(self) -> Tensor | None:
        """A conditional run's requested class of each sample: the classes in turn (0, 1, ..., K-1, 0, ...)."""
        return torch.arange(self.options.num) % len(self.run.classes) if self.run.conditional else None

    @cached_property
    def samples(self) -> Tensor:
        """The run's samples (num, ...): images clipped and rounded to 8 bits, as a saved PNG would hold.
        A conditional run draws ``labels``, with its guidance."""
        o = self.options
        x = self.run.sample(o.num, labels=self.labels, options=self.sample_options, batch_size=o.batch_size,
                            seed=o.seed, progress=o.progress)
        return _quantize(x) if self.run.kind == "image" else x

    def sampler_description(self) -> str:
        options = self.sample_options
        text = f"{options.sampler}, {options.steps or self.run.schedule.num_steps} steps"
        return text + (f", guidance {options.guidance:g}" if self.run.conditional else "")


def _quantize(images: Tensor) -> Tensor:
    """Clip to [-1, 1] and round to the 256 levels an 8-bit image can hold."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


# --- the metrics ----------------------------------------------------------------------------------

def _bpd(e: _Evaluation) -> dict[str, Any]:
    o, run = e.options, e.run
    reference = e.reference(o.heldout)
    images = run.kind == "image"
    x0 = _quantize(reference.data) if images else reference.data
    model = run.ema_model
    if run.conditional:  # the bound of p(x0 | class), each example conditioned on its true class
        model = functools.partial(model, labels=reference.labels.to(run.schedule.device))
    bound = variational_bound(model, run.schedule, x0.to(run.schedule.device),
                              prediction=run.config.diffusion.prediction, variance=o.bound_variance,
                              decoder="discretized" if images else "gaussian",
                              generator=torch.Generator(run.schedule.device).manual_seed(o.seed), progress=o.progress)
    total = bound.total.cpu()
    terms = bound.terms.mean(0).cpu()
    return {
        "bpd": float(total.mean()),
        "standard_error": float(total.std() / math.sqrt(len(total))) if len(total) > 1 else float("nan"),
        "prior": float(bound.prior.mean()),
        "decoder": float(terms[0]),
        "kl_terms": float(terms[1:].sum()),
        "examples": len(total),
        "decoder_kind": "discretized (8-bit)" if images else "gaussian (continuous; can be negative)",
        "variance": o.bound_variance,
    } | ({"conditioned_on": "each example's true class"} if run.conditional else {})


class MnistScores(NamedTuple):
    """FID-MNIST and the classifier's view of some samples, with the features the numbers came from."""

    report: dict[str, Any]  # fid, fid_of_real_digits, confident_fraction, mean_max_prob, class_histogram, ...
    classifier: torch.nn.Module
    sample_features: Tensor  # (N, 128)
    test_features: Tensor  # (10000, 128), of the MNIST test digits
    test_labels: Tensor  # (10000,)


def score_mnist(samples: Tensor, *, data_dir: str | None = None, seed: int = 0, progress: bool = False) -> MnistScores:
    """FID-MNIST of ``samples`` (N, 1, 28, 28) in [-1, 1] against the 10,000 MNIST test digits, its floor
    (as many real training digits, drawn with ``seed``), and the share the classifier is sure of.
    Samples from anywhere (another library's too) are scored the same way as `ddpm eval`'s."""
    from ddpm.evaluation.classifier import classifier_view, load_mnist_classifier, mnist_features

    model, info = load_mnist_classifier(data_dir=data_dir, progress=progress)
    test = load_dataset("mnist", split="test", data_dir=data_dir)
    bar = (lambda what: f"FID-MNIST features ({what})") if progress else (lambda what: None)
    test_features = mnist_features(model, test.data, progress=bar("test digits"))
    sample_features = mnist_features(model, samples, progress=bar("samples"))
    reference = feature_statistics(test_features)
    # The floor: the same statistic for as many real training digits as there are samples.
    real = load_dataset("mnist", split="train", n=len(samples), seed=seed, data_dir=data_dir)
    floor = frechet_distance(feature_statistics(mnist_features(model, real.data, progress=bar("training digits"))),
                             reference)
    view = classifier_view(model, samples)
    report = {
        "fid": frechet_distance(feature_statistics(sample_features), reference),
        "fid_of_real_digits": floor,
        "confident_fraction": float(view.confident_fraction),
        "mean_max_prob": float(view.mean_max_prob),
        "class_histogram": [round(float(c), 4) for c in view.class_histogram],
        "samples": len(samples),
        "reference": f"{len(test)} MNIST test digits",
        "classifier_test_accuracy": float(info["test_accuracy"]),
    }
    return MnistScores(report, model, sample_features, test_features, test.labels)


def _fid_mnist(e: _Evaluation) -> dict[str, Any]:
    scores = score_mnist(e.samples, data_dir=e.data_dir, seed=e.options.seed, progress=e.options.progress)
    report = dict(scores.report)
    if e.run.conditional:
        report |= _per_class(e, scores.classifier, scores.sample_features, scores.test_features, scores.test_labels)
    return report | {"sampler": e.sampler_description()}


def _per_class(e: _Evaluation, model: torch.nn.Module, sample_features: Tensor, test_features: Tensor,
               test_labels: Tensor) -> dict[str, Any]:
    """A conditional MNIST run: the share of samples the classifier assigns to the class they were drawn
    for, and FID-MNIST of each class's samples against that digit's test images (from the features
    _fid_mnist computed for all of them)."""
    from ddpm.evaluation.classifier import classifier_accuracy

    if tuple(e.run.classes) != MNIST_CLASSES:
        raise ValueError(f"the run's classes {', '.join(e.run.classes)} are not MNIST's digits 0..9")
    asked = e.labels
    accuracy = classifier_accuracy(model, e.samples, asked)
    fids = []
    for digit in range(len(MNIST_CLASSES)):
        mine = sample_features[asked == digit]
        if len(mine) < 2:
            fids.append(float("nan"))
            continue
        fids.append(frechet_distance(feature_statistics(mine),
                                     feature_statistics(test_features[test_labels == digit])))
    return {"class_accuracy": accuracy, "fid_per_class": [round(f, 3) for f in fids],
            "fid_per_class_mean": sum(fids) / len(fids)}


def _fid(e: _Evaluation) -> dict[str, Any]:
    from ddpm.evaluation.inception import inception_features, load_inception

    o = e.options
    model = load_inception(o.inception_weights, device=e.run.schedule.device)
    reference = e.reference(max(o.num, 2))
    bar = (lambda what: f"Inception features ({what})") if o.progress else (lambda what: None)
    fid = frechet_distance(feature_statistics(inception_features(model, e.samples, progress=bar("samples"))),
                           feature_statistics(inception_features(model, reference.data, progress=bar("held out"))))
    return {"fid": fid, "samples": len(e.samples), "reference": f"{len(reference)} held-out images",
            "sampler": e.sampler_description()}


def _energy(e: _Evaluation) -> dict[str, Any]:
    # The noise floor compares two disjoint sets of held-out points, as many as the samples where the
    # data has 2n, else its two halves (overlapping sets would pull the floor towards 0).
    n = len(e.samples)
    pool = e.reference(2 * n).data
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(e.options.seed))]
    size = min(n, len(pool) // 2)
    if size < 2:
        raise ValueError(f"the energy metric needs at least 4 held-out points for its noise floor; "
                         f"the data holds {len(pool)}")
    # The same number of samples as of held-out points on both sides, so that the estimator's bias
    # (which falls as 1/size) is the same for the distance and its floor.
    data, other = pool[:size], pool[size:2 * size]
    return {"energy_distance": energy_distance(e.samples[:size], data), "noise_floor": energy_distance(other, data),
            "samples": size, "reference": f"{size} held-out points, and {size} others for the noise floor",
            "sampler": e.sampler_description()}


def _gradient(e: _Evaluation) -> dict[str, Any]:
    from ddpm.data.synthetic import nearest_gradient_distance

    distance = nearest_gradient_distance(e.samples)
    real = nearest_gradient_distance(_quantize(e.reference(len(e.samples)).data))
    return {"mean": float(distance.mean()), "median": float(distance.median()),
            "p90": float(distance.quantile(0.9)), "real_data_mean": float(real.mean()),
            "samples": len(distance), "sampler": e.sampler_description()}


def _square(e: _Evaluation) -> dict[str, Any]:
    from ddpm.data.synthetic import make_square

    c, h, _ = e.run.sample_shape
    error = square_error(e.samples, make_square(1, channels=c, image_size=h)[0])
    return {"mean": float(error.mean()), "median": float(error.median()),
            "within_0.1": float((error < 0.1).float().mean()), "samples": len(error),
            "sampler": e.sampler_description()}


_METRIC_FUNCTIONS: dict[str, Callable[[_Evaluation], dict[str, Any]]] = {
    "bpd": _bpd, "fid": _fid, "fid-mnist": _fid_mnist, "energy": _energy, "gradient": _gradient, "square": _square,
}
