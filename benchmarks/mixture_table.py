"""Every ODE solver on every grid at 10 and 20 calls, fed the exact noise predictor of the sampler
tests' 2-D Gaussian mixture (docs/sampling.md).

    python benchmarks/mixture_table.py [--json FILE]

The error is tests/test_solvers.py's: the largest error of the component shares, means and standard
deviations of 100,000 samples (seed 1) against a 400,000-point draw of the data, in units of each
component's standard deviation. DDPM on all 1000 steps and DDIM at the same calls are the references.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ddpm import NoiseSchedule, sample
from ddpm.analytic import optimal_eps_model
from ddpm.grids import GRIDS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_solvers import MIXTURE, ODE_SOLVERS, component_statistics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reference = component_statistics(MIXTURE.sample(400_000, torch.Generator().manual_seed(9)).float())
    scale = torch.cat([reference[:, :1], MIXTURE.stds.double(), MIXTURE.stds.double()], 1)
    schedule = NoiseSchedule("linear", 1000)
    model = optimal_eps_model(MIXTURE, schedule)

    def error(**options) -> float:
        x = sample(model, schedule, (100_000, 2), generator=torch.Generator().manual_seed(1), **options)
        return float(((component_statistics(x) - reference) / scale).abs().max())

    errors = {"ddpm-1000": error(sampler="ddpm")}
    for calls in (10, 20):
        errors[f"ddim-{calls}"] = error(sampler="ddim", steps=calls)
        for name in ODE_SOLVERS:
            for grid in GRIDS:
                errors[f"{name}-{grid}-{calls}"] = error(sampler=name, steps=calls, spacing=grid)
                print(f"{name:8s} {grid:9s} {calls:3d} calls: {errors[f'{name}-{grid}-{calls}']:.4f}", flush=True)
    print(f"ddpm, 1000 calls: {errors['ddpm-1000']:.4f}; ddim: 10 calls {errors['ddim-10']:.4f}, "
          f"20 calls {errors['ddim-20']:.4f}")
    if args.json:
        args.json.write_text(json.dumps(errors, indent=1) + "\n")


if __name__ == "__main__":
    main()
