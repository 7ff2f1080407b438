"""What ddpm's MNIST classifier is unsure of in a run's samples: the share it is sure of (top
probability >= 0.9), how the rest spread over probability bands, which two digits it hesitates
between most, and a picture of samples from each band (docs/results.md, "What limits the confident
share").

    python benchmarks/confidence.py RUN_DIR --data-dir ../shared/data/mnist [--num 1000] [--seed 1]
        [--checkpoints] [--image docs/images/mnist-confidence.png] [--json OUT.json]

The samples are drawn as `ddpm sample` draws them by default, from ``--seed``. --checkpoints does the
same for every checkpoint the run keeps, to show how the share moves with training.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ddpm import load
from ddpm.evaluation.classifier import NUM_CLASSES, load_mnist_classifier
from ddpm.evaluation.metrics import in_batches
from ddpm.visualize import save_labelled_rows

BANDS = ((0.0, 0.5), (0.5, 0.9), (0.9, 1.01))  # top probability bands; the last is "confident"


def probabilities(classifier: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The classifier's softmax (N, 10), batched as the scores batch it."""
    device = next(classifier.parameters()).device
    return in_batches(classifier, images, 500, device, NUM_CLASSES).double().softmax(dim=1)


def report(probs: torch.Tensor) -> dict[str, Any]:
    top2 = probs.topk(2, dim=1)
    top = top2.values[:, 0]
    unsure = top < 0.9
    pairs = Counter(tuple(sorted(pair)) for pair in top2.indices[unsure].tolist())
    return {"confident_fraction": (~unsure).double().mean().item(),
            "bands": {f"{lo:g}-{min(hi, 1):g}": ((top >= lo) & (top < hi)).double().mean().item() for lo, hi in BANDS},
            "unsure_between": [{"digits": list(pair), "share_of_unsure": count / max(1, int(unsure.sum()))}
                               for pair, count in pairs.most_common(5)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--checkpoints", action="store_true", help="also every checkpoint the run keeps")
    parser.add_argument("--image", type=Path, default=None, help="a PNG of 16 samples from each band")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    classifier, _ = load_mnist_classifier(data_dir=args.data_dir, progress=True)
    places = sorted((args.run / "checkpoints").glob("step_*")) if args.checkpoints else [args.run]
    results = {}
    for place in places:
        run = load(place)
        samples = run.sample(args.num, seed=args.seed, batch_size=250, progress=True)
        probs = probabilities(classifier, samples)
        results[str(run.step)] = report(probs)
        print(f"step {run.step}: confident {results[str(run.step)]['confident_fraction']:.3f}",
              json.dumps(results[str(run.step)]))
    if args.image:  # from the last place (the run itself, or its newest checkpoint)
        top = probs.max(dim=1).values
        rows = {}
        for lo, hi in BANDS:
            chosen = samples[(top >= lo) & (top < hi)][:16]
            if len(chosen) == 16:
                rows[f"p {lo:g}-{min(hi, 1):g}"] = chosen
        save_labelled_rows(rows, args.image)
    if args.json:
        args.json.write_text(json.dumps({"run": str(args.run), "num": args.num, "seed": args.seed,
                                         "steps": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
