"""The training recipe's options for a fixed budget: learning-rate decay, --time-budget, EDM's weighting."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

import ddpm
from ddpm import distributed, training
from ddpm.config import build_config, config_to_dict
from ddpm.diffusion import EDM_P_MEAN, EDM_P_STD, loss_weights, sample_timesteps, timestep_density
from ddpm.schedule import NoiseSchedule
from ddpm.training import learning_rate, train
from test_training import ddpm_cli, weights_bytes

QUIET = {"log_every": 5, "eval_every": 0, "sample_every": 0, "tensorboard": False}


@pytest.mark.parametrize("decay, expected", [
    # lr 1, 2 warm-up steps, 6 steps: warm-up 1/2, 1; then the fraction left of the 4 decaying steps
    # is 1, 3/4, 1/2, 1/4 (0 would come after the last step).
    ("constant", [0.5, 1, 1, 1, 1, 1]),
    ("linear", [0.5, 1, 1, 0.75, 0.5, 0.25]),
    ("cosine", [0.5, 1, 1, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.cos(math.pi / 4))]),
])
def test_learning_rate_decays_after_the_warm_up_to_zero_after_the_last_step(decay, expected):
    config = build_config("square-fast", {"train": {"lr": 1.0, "warmup": 2, "steps": 6, "lr_decay": decay}})
    assert [learning_rate(config, step) for step in range(6)] == pytest.approx(expected, abs=1e-12)


def test_new_recipe_fields_are_written_only_when_used():
    plain = config_to_dict(build_config("square-fast"))["train"]
    assert "lr_decay" not in plain and "time_budget" not in plain  # config.json as before they existed
    used = config_to_dict(build_config("square-fast", {"train": {"lr_decay": "cosine", "time_budget": "2m"}}))
    assert used["train"]["lr_decay"] == "cosine" and used["train"]["time_budget"] == "2m"


def _budget_config(**train_options):
    return build_config("square-fast", {"train": {"time_budget": "5s", "lr_decay": "cosine", "checkpoint_every": 20,
                                                  "keep_checkpoints": 100, **QUIET, **train_options}})


def test_time_budget_fixes_the_steps_records_them_and_resume_trains_the_same_steps(tmp_path):
    result = train(_budget_config(), tmp_path / "straight", progress=False, log=lambda message: None)
    saved = json.loads((tmp_path / "straight" / "config.json").read_text())
    plan = saved["time_budget"]
    assert saved["config"]["train"]["steps"] == plan["steps"] == result.step
    first, last = plan["measured_over_steps"]
    # From step 10 to 40, unless the warm-up (100 steps) is still on when a tenth of the budget is not spent.
    assert first == 10 and 40 <= last <= 100 and plan["seconds"] == 5.0
    # The steps fill the budget at the measured step time (the time before the measurement's end included).
    assert last < plan["steps"] <= last + 5.0 / plan["seconds_per_step"]
    metrics = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == plan["steps"]
    assert metrics[-1]["lr"] < 0.05 * _budget_config().train.lr  # the decay ended with the run

    # Rewind a copy to its first checkpoint after the steps were fixed and resume it: no new measurement,
    # the same steps, the same weights.
    rewind_to = -(-last // 20) * 20
    assert rewind_to < plan["steps"]
    rewound = tmp_path / "rewound"
    shutil.copytree(tmp_path / "straight", rewound)
    for checkpoint in (rewound / "checkpoints").glob("step_*"):
        if int(checkpoint.name.split("_")[1]) > rewind_to:
            shutil.rmtree(checkpoint)
    (rewound / "checkpoints" / "latest").write_text(f"step_{rewind_to:07d}")
    resumed = train(_budget_config(), rewound, resume=True, progress=False, log=lambda message: None)
    assert resumed.step == plan["steps"]
    assert json.loads((rewound / "config.json").read_text())["time_budget"] == plan
    assert weights_bytes(rewound) == weights_bytes(tmp_path / "straight")


@pytest.mark.parametrize("warmup, end", [(1000, 80), (60, 60), (0, 40)])
def test_time_budget_plan_ends_its_measurement_at_the_warm_up_or_a_tenth_of_the_budget(monkeypatch, warmup, end):
    # A clock that moves 1/8 s a step, a 100 s budget: a tenth of it (10 s) has passed after step 80, so
    # the measurement ends there, or at the end of a shorter warm-up (but not before step 40). Whatever
    # its end, it measures 1/8 s a step and plans the step count that fills 100 s: 800.
    clock = [0.0]
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    plan = training._BudgetPlan(100.0, 0, warmup, torch.device("cpu"))
    ends = {}
    for step in range(1, 200):
        clock[0] = step / 8
        if (per_step := plan.steps_after(step, distributed.SINGLE)) is not None:
            ends[step] = per_step
    assert ends == {end: 0.125}
    clock[0] = end / 8
    assert plan.fix(end, 0.125, {}, distributed.SINGLE) == {
        "seconds": 100.0, "seconds_per_step": 0.125, "measured_over_steps": [10, end], "periodic_seconds": {},
        "steps": 800}


def test_time_budget_plan_leaves_time_for_the_periodic_work(monkeypatch):
    # Measured at step 40, 5 s after the start, 1/8 s a step, 100 s in all. A sample grid every 100 steps
    # (and at the last) costing 2 s and a held-out loss every 250 (and at the last) costing 1 s: the plan
    # is the largest step count whose steps and jobs fit, found here by trying every count.
    clock = [5.0]
    monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    plan = training._BudgetPlan(100.0, 0, 0, torch.device("cpu"))
    plan.started = 0.0
    periodic = {"samples": (100, 2.0), "heldout": (250, 1.0)}
    fixed = plan.fix(40, 0.125, periodic, distributed.SINGLE)

    def seconds(steps):
        return 5 + 0.125 * (steps - 40) + 2 * -(-steps // 100) + 1 * -(-steps // 250)
    assert fixed["steps"] == max(s for s in range(40, 2000) if seconds(s) <= 100)
    assert fixed["periodic_seconds"] == {"samples": 2.0, "heldout": 1.0}
    # Jobs are timed by doing them.
    def job():
        clock[0] += 0.5
    assert plan.time_jobs({"samples": job}, distributed.SINGLE) == {"samples": 0.5}


def test_time_budget_outlasts_a_preset_step_count_shorter_than_its_measurement(tmp_path):
    # The preset's 30 steps end before the warm-up (60 steps) that the measurement runs through: the
    # budget, not the preset, sets how long the run trains.
    result = train(_budget_config(steps=30, warmup=60), tmp_path / "run", progress=False, log=lambda message: None)
    plan = json.loads((tmp_path / "run" / "config.json").read_text())["time_budget"]
    assert 40 <= plan["measured_over_steps"][1] <= 60 < plan["steps"] == result.step


def test_time_budget_flag_errors_are_one_line(tmp_path):
    for args, says in ((["--time-budget", "20 minutes"], 'write a duration like "90s"'),
                       (["--time-budget", "0s"], "more than 0 seconds"),
                       (["--time-budget", "1m", "--steps", "100"], "--steps and --time-budget both set")):
        result = ddpm_cli("train", "--out", "run", *args, "--quiet", cwd=tmp_path, check=False)
        assert result.returncode == 2 and says in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "run").exists()


def test_edm_timestep_density_is_the_log_normal_density_of_sigma():
    # Under the density, ln sigma_t has EDM's mean and standard deviation (up to the grid's steps and
    # the tails the schedule cuts off: ln sigma runs from -4.6 to 5.1, N(-1.2, 1.2) puts 0.3% below).
    schedule = NoiseSchedule("linear", 1000)
    density = timestep_density(schedule, "edm").double()
    assert density.sum().item() == pytest.approx(1.0, abs=1e-6) and (density > 0).all()
    log_sigma = 0.5 * torch.log(1 / schedule.alphas_cumprod_float64() - 1)
    mean = (density * log_sigma).sum().item()
    std = (density * (log_sigma - mean) ** 2).sum().sqrt().item()
    assert mean == pytest.approx(EDM_P_MEAN, abs=0.02) and std == pytest.approx(EDM_P_STD, abs=0.03)
    # Drawn timesteps follow it (mean of t within 5 standard errors).
    t = sample_timesteps(schedule, 200_000, generator=torch.Generator().manual_seed(0), weighting="edm").double()
    grid = torch.arange(1000, dtype=torch.float64)
    expected = (density * grid).sum().item()
    spread = math.sqrt((density * (grid - expected) ** 2).sum().item() / 200_000)
    assert abs(t.mean().item() - expected) < 5 * spread
    uniform = timestep_density(schedule, None)
    assert torch.allclose(uniform, torch.full((1000,), 1e-3))


def test_edm_weights_are_lambda_sigma_in_each_parameterisation():
    # EDM's lambda = (sigma^2 + 1/4) / (sigma^2 / 4) weighs the x0 error; the eps error is the x0 error
    # over sigma and the v error over sigma / sqrt(1 + sigma^2), so the eps weight is 1 + 4 sigma^2 and
    # the v weight (1 + 4 sigma^2) / (1 + sigma^2), all with one constant that makes the eps weight
    # average 1 under the density.
    schedule = NoiseSchedule("cosine", 1000)
    t = torch.arange(1000)
    sigma2 = 1 / schedule.alphas_cumprod_float64() - 1
    eps = loss_weights(schedule, t, "eps", "edm").double()
    density = timestep_density(schedule, "edm").double()
    assert (density * eps).sum().item() == pytest.approx(1.0, rel=1e-5)
    scale = eps[500] / (1 + 4 * sigma2[500])
    assert torch.allclose(eps, scale * (1 + 4 * sigma2), rtol=1e-4)
    assert torch.allclose(loss_weights(schedule, t, "v", "edm").double(), scale * (1 + 4 * sigma2) / (1 + sigma2),
                          rtol=1e-4)
    assert torch.allclose(loss_weights(schedule, t, "x0", "edm").double(), scale * (1 + 4 * sigma2) / sigma2,
                          rtol=1e-4)


def test_edm_weighting_trains_and_its_heldout_loss_draws_its_timesteps(tmp_path):
    config = build_config("toy2d", {"data": {"num_examples": 600, "heldout": 64}, "diffusion": {"weighting": "edm"},
                                    "model": {"overrides": {"hidden_dim": 16, "num_blocks": 1}},
                                    "train": {"steps": 20, "batch_size": 32, **QUIET, "eval_every": 10}})
    result = train(config, tmp_path / "edm", progress=False, log=lambda message: None)
    assert math.isfinite(result.loss)
    run = ddpm.load(tmp_path / "edm")
    assert run.config.diffusion.weighting == "edm"
