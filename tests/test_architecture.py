"""The layout's promises: one carrier of sampling options, samplers by name, one home per check,
and sampling that never goes through the training module."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

import ddpm
from ddpm.config import SampleConfig, build_config, config_from_dict, config_to_dict, resumable_fields
from ddpm.sampling import SAMPLERS, ddim_coefficients, sample, timestep_sequence
from ddpm.validation import SettingError, choices_of


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    from ddpm.cli import main

    cwd = tmp_path_factory.mktemp("arch")
    code = main(["train", "--out", str(cwd / "run"), "--steps", "2", "--num-steps", "20", "--batch-size", "8",
                 "--sample-steps", "3", "--sampler", "ddim", "--eta", "0.5", "--num-samples", "2",
                 "--eval-every", "0", "--no-tensorboard", "--quiet"])
    assert code == 0
    return cwd / "run"


def test_the_registry_holds_exactly_the_samplers_the_config_allows():
    assert set(SAMPLERS) == set(choices_of(typing.get_type_hints(SampleConfig)["sampler"]))
    for f in dataclasses.fields(SampleConfig):  # an option read by a sampler names registered ones only
        assert set(f.metadata.get("used_by", ())) <= set(SAMPLERS), f.name


def test_sample_and_eval_take_every_sampling_option_as_a_flag(capsys):
    from ddpm.cli import main
    from ddpm.config import sample_flag_fields

    flags = {f.flag for f in sample_flag_fields()}
    assert flags == {"--sampler", "--steps", "--eta", "--variance", "--spacing", "--clip", "--threshold", "--guidance"}
    for command in ("sample", "eval"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), command
        assert "one of: ddpm, ddim, euler, heun, ipndm, dpm++2m, dpm++3m" in " ".join(text.split())  # the choices are listed, not learned from an error


def test_sample_dispatches_by_name_to_the_registered_loop(monkeypatch):
    # sample() checks the options, then calls SAMPLERS[name] with them: replacing the entry replaces the walk.
    seen = {}

    def fake(denoiser, x, schedule, timesteps, options, *, generator, callback, progress):
        seen.update(timesteps=timesteps, options=options, first=denoiser(x, timesteps[0]))
        return torch.full_like(x, 7.0)

    monkeypatch.setitem(SAMPLERS, "ddim", SAMPLERS["ddim"]._replace(walk=fake))
    schedule = ddpm.NoiseSchedule("linear", 100)
    out = sample(lambda x, t: torch.zeros_like(x), schedule, (2, 3), sampler="ddim", steps=4, eta=0.25)
    assert torch.equal(out, torch.full((2, 3), 7.0))
    assert seen["timesteps"] == timestep_sequence(100, 4) and seen["options"].eta == 0.25
    # the grid: the sampler's own unless the options name one
    sample(lambda x, t: torch.zeros_like(x), schedule, (2, 3), sampler="ddim", steps=4, spacing="trailing")
    assert seen["timesteps"] == timestep_sequence(100, 4, "trailing") == [99, 74, 49, 24]
    pred_x0, pred_eps = seen["first"]
    assert torch.equal(pred_eps, torch.zeros(2, 3))


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_with_eta_forms_its_last_step_in_float64(steps):
    # On the step into t = 0, 1 - alpha_bar_prev - sigma^2 (exactly 8.5e-8 at 10 steps, eta 1) is below
    # one float32 ulp of 1: formed in float32 the direction coefficient came out about 5% wrong at 10 steps.
    schedule = ddpm.NoiseSchedule("linear", 1000)
    timesteps = timestep_sequence(1000, steps)
    table = schedule.alphas_cumprod_float64()
    a, a_prev = table[timesteps[-2]], table[0]
    sigma = ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
    exact = (1 - a_prev - sigma**2).sqrt()
    assert float(ddim_coefficients(schedule, timesteps, 1.0).direction[-2]) == pytest.approx(float(exact), rel=1e-6)
    # The same inside a walk, with the exact eps of N(0, I) data (sqrt(1 - alpha_bar_t) x_t), which keeps
    # x near 1: the step into t = 0 gives x_prev = sqrt(alpha_bar_0) x0_hat + direction eps_hat + sigma z.
    def exact_eps(x, t):
        return schedule.sqrt_one_minus_alphas_cumprod[t].reshape(-1, 1) * x

    seen = []
    sample(exact_eps, schedule, (64, 2), sampler="ddim", steps=steps, eta=1.0,
           generator=torch.Generator().manual_seed(0), callback=seen.append)
    step = seen[-2]
    generator = torch.Generator().manual_seed(0)  # the walk's own draws again: x_T, then one per noisy step
    z = [torch.randn(64, 2, generator=generator) for _ in range(len(timesteps))][-1].double()
    pred_eps = exact_eps(step.x_t, torch.full((64,), timesteps[-2])).double()
    direction = (step.x_prev.double() - float(a_prev.sqrt()) * step.pred_x0.double() - float(sigma) * z) / pred_eps
    assert float(direction.median()) == pytest.approx(float(exact), rel=2e-3)


def test_a_runs_options_resolve_in_one_place(tiny_run):
    run = ddpm.load(tiny_run)
    assert run.sample_options() == run.config.sample  # ddim, 3 steps, eta 0.5
    other = run.sample_options(sampler="ddpm")
    assert (other.sampler, other.steps, other.eta) == ("ddpm", None, 0.0)  # the run's walk stays with its sampler
    assert run.sample_options(steps=2).eta == 0.5  # its own sampler keeps its eta
    assert run.sample_options(spacing="leading", sampler="ddpm").spacing == "leading"
    with pytest.raises(SettingError, match="steps = 21 is not allowed; this run has T = 20"):
        run.sample_options(steps=21)
    with pytest.raises(SettingError, match="eta = 0.3 is not allowed; it applies to sampler ddim only"):
        run.sample_options(sampler="ddpm", eta=0.3)


def test_sampling_and_evaluating_never_import_the_training_module(tiny_run, tmp_path):
    script = (
        "import sys\n"
        "from ddpm.cli import main\n"
        f"assert main(['sample', {str(tiny_run)!r}, '--num', '2', '--quiet', "
        f"'--out', {str(tmp_path / 'x.npz')!r}]) == 0\n"
        f"assert main(['eval', {str(tiny_run)!r}, '--metric', 'square', '--num', '2', '--quiet', "
        f"'--json', {str(tmp_path / 'e.json')!r}]) == 0\n"
        "import ddpm\n"
        f"ddpm.load({str(tiny_run)!r}).sample(1)\n"
        "assert 'ddpm.training' not in sys.modules, 'training was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr


def test_resumable_fields_are_marked_on_the_fields():
    marked = resumable_fields()
    assert {"train.steps", "train.device", "data.data_dir", "sample.sampler", "sample.steps"} <= marked
    assert not {"train.lr", "train.batch_size", "train.seed", "diffusion.num_steps", "model.preset"} & marked


def test_saved_configs_with_the_old_sample_steps_key_load():
    saved = config_to_dict(build_config("mnist"))
    saved["sample"] = {"sampler": "ddim", "sample_steps": 20}  # what runs wrote before the key was renamed
    assert config_from_dict(saved).sample.steps == 20
    assert build_config("mnist", {"sample": {"sample_steps": 7}}).sample.steps == 7  # and TOML files


@pytest.mark.parametrize("layers, message", [
    ({"data": {"source": ""}}, "data.source = '' is not allowed; name a built-in dataset"),
    ({"train": 5}, "[train] = 5 is not allowed; a section is a table of fields"),
    ({"sample": {"eta": 2}}, "sample.eta = 2.0 is not allowed"),
    ({"sample": {"steps": 2000}}, "sample.steps = 2000 is not allowed; it must be in 1..1000"),
    ({"data": {"channels": 2}}, "data.channels = 2 is not allowed; choose from: 1, 3 (or none)"),
    ({"train": {"lr": math.inf}}, "train.lr = inf is not allowed; it must be in (0, inf)"),
    ({"train": {"lr": math.nan}}, "train.lr = nan is not allowed"),
])
def test_each_setting_is_checked_where_it_enters(layers, message):
    with pytest.raises(SettingError) as error:
        build_config("square", layers)
    assert message in str(error.value)


def test_a_train_section_that_is_not_a_table_keeps_nothing_of_the_flags(tmp_path, capsys):
    # A TOML `train = 5` beside a train flag used to replace the preset's whole [train] section.
    from ddpm.cli import main

    (tmp_path / "c.toml").write_text("train = 5\n")
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--steps", "3", "--out", str(tmp_path / "r")]) == 2
    assert "[train] = 5 is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("device", ["meta", "gpu0"])
def test_a_device_that_holds_no_values_is_refused(device):
    with pytest.raises(SettingError, match=f"device = '{device}' is not allowed; use cpu, cuda"):
        ddpm.build.resolve_device(device, setting="device")


def test_run_sample_takes_the_grid_and_thresholding_as_keywords_or_options(tiny_run):
    run = ddpm.load(tiny_run)
    seen = []
    run.sample(2, sampler="dpm++2m", steps=4, spacing="trailing", threshold=0.9, callback=seen.append)
    assert [step.t for step in seen] == timestep_sequence(20, 4, "trailing")
    assert all(step.pred_x0.abs().max() <= 1.0 + 1e-6 for step in seen)
    with pytest.raises(ValueError, match="either as options= or as keywords, not both"):
        run.sample(2, options=run.sample_options(), spacing="leading")


def test_run_sample_replays_a_cuda_graph_by_default_only_on_cuda(tiny_run, monkeypatch):
    # The run's own sampling turns the graph on for a CUDA device; on a CPU the default is the plain
    # loop, and asking for it runs the fixed-tensor walk a graph would replay (the same samples).
    import ddpm.cuda_graph

    made = []

    class Counted(ddpm.cuda_graph.GraphedModel):
        def __init__(self, model, *, capture):
            made.append(capture)
            super().__init__(model, capture=capture)

    monkeypatch.setattr(ddpm.cuda_graph, "GraphedModel", Counted)
    run = ddpm.load(tiny_run)
    plain = run.sample(3, steps=3, seed=1, batch_size=2)
    assert made == []
    graphed = run.sample(3, steps=3, seed=1, cuda_graph=True, batch_size=2)
    assert made == [False, False] and torch.equal(plain, graphed)
