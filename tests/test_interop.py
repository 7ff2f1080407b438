"""Import and export of Hugging Face diffusers folders, checked against diffusers 0.42.1 itself (a test
dependency, never a runtime one): ddpm's U-Net must give UNet2DModel's eps for the configs it accepts,
an exported run must load in DDPMPipeline and step as ddpm steps, and a round trip must keep every weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import diffusers  # the reference: a test dependency (the `test` extra), never a runtime one

import ddpm
from ddpm.cli import main
from ddpm.config import build_config
from ddpm.interop import read_diffusers, unet_config_from_diffusers, weights_from_diffusers
from ddpm.models import model_from_config
from ddpm.training import train

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

SMALL = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
             norm_num_groups=8)
# google/ddpm-cifar10-32 (the paper's CIFAR-10 model) and google/ddpm-celebahq-256, as their config.json say.
PAPER = dict(act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
             flip_sin_to_cos=False, freq_shift=1, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-6,
             norm_num_groups=32, time_embedding_type="positional", in_channels=3, out_channels=3)
CIFAR10 = dict(PAPER, sample_size=32, block_out_channels=(128, 256, 256, 256),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
CELEBAHQ = dict(PAPER, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
                down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)


def random_unet(seed: int = 0, **config) -> "diffusers.UNet2DModel":
    """A UNet2DModel with every weight random (diffusers zero-initialises none, but make sure)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def imported(folder: Path):
    read = read_diffusers(folder)
    config = unet_config_from_diffusers(read.unet_config)
    network = model_from_config(config).eval()
    network.load_state_dict(weights_from_diffusers(read.weights, config, read.unet_config["flip_sin_to_cos"]))
    return network


@pytest.mark.parametrize("name, config, size", [
    ("small", SMALL, 8),
    ("small, diffusers' defaults (flipped embedding, 8-channel heads)", dict(SMALL, attention_head_dim=8), 8),
    ("small, the paper's settings", dict(SMALL, **{k: PAPER[k] for k in ("downsample_padding", "flip_sin_to_cos",
                                                                          "freq_shift", "norm_eps")},
                                         attention_head_dim=None), 8),
    ("small, class-conditional", dict(SMALL, num_class_embeds=4), 8),
    ("google/ddpm-cifar10-32", CIFAR10, 32),
    ("google/ddpm-celebahq-256 (at 64x64: the network is convolutional)", CELEBAHQ, 64),
])
def test_ddpms_unet_gives_unet2dmodels_eps(tmp_path, name, config, size):
    reference = random_unet(**config)
    reference.save_pretrained(tmp_path / "unet")
    network = imported(tmp_path / "unet")
    x = torch.randn(2, config["in_channels"], size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3, 871])
    labels = torch.tensor([0, 3]) if "num_class_embeds" in config else None
    with torch.no_grad():
        theirs = reference(x, t, class_labels=labels).sample
        ours = network(x, t, labels)
    assert relative_difference(theirs, ours) <= 1e-5, name


def test_the_settings_where_implementations_differ_each_matter(tmp_path):
    """Each field ddpm added for diffusers' configs changes the output: the test above would fail without it."""
    random_unet(**dict(SMALL, **{k: PAPER[k] for k in ("downsample_padding", "flip_sin_to_cos", "freq_shift",
                                                        "norm_eps")}, attention_head_dim=4)).save_pretrained(tmp_path)
    read = read_diffusers(tmp_path)
    config = unet_config_from_diffusers(read.unet_config)
    weights = weights_from_diffusers(read.weights, config, False)
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 871])
    exact = model_from_config(config).eval()
    exact.load_state_dict(weights)
    import dataclasses

    for field, ours in (("norm_eps", 1e-5), ("time_freq_shift", 0.0), ("downsample_padding", 1),
                        ("attention_head_dim", None)):
        other = model_from_config(dataclasses.replace(config, **{field: ours})).eval()
        other.load_state_dict(weights)
        with torch.no_grad():
            assert relative_difference(exact(x, t), other(x, t)) > 1e-5, field


def test_legacy_attention_names_and_a_bin_file_are_read(tmp_path):
    reference = random_unet(**SMALL)
    reference.save_pretrained(tmp_path / "current")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((tmp_path / "current" / "config.json").read_text())
    renamed = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
               .replace(".to_out.0.", ".proj_attn."): v for k, v in reference.state_dict().items()}
    assert any(".proj_attn." in k for k in renamed)
    torch.save(renamed, legacy / "diffusion_pytorch_model.bin")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 871])
    with torch.no_grad():
        assert torch.equal(imported(legacy)(x, t), imported(tmp_path / "current")(x, t))


def _trained_run(tmp_path: Path, **model) -> Path:
    config = build_config("square-fast", {
        "model": {"preset": "unet", "overrides": {"ch": 16, "channel_mult": [1, 2], "num_groups": 8, **model}},
        "diffusion": {"num_steps": 50},
        "train": {"steps": 3, "batch_size": 8, "checkpoint_every": 3, "sample_every": 0, "eval_every": 0,
                  "tensorboard": False},
        "sample": {"sampler": "ddpm", "variance": "fixed_large"}})
    return train(config, tmp_path / "run", progress=False, log=lambda message: None).run_dir


def test_an_exported_run_loads_in_diffusers_and_steps_as_ddpm_does(tmp_path, capsys):
    run_dir = _trained_run(tmp_path)
    assert main(["export", str(run_dir), "--out", str(tmp_path / "exported")]) == 0
    run = ddpm.load(run_dir)
    pipeline = diffusers.DDPMPipeline.from_pretrained(tmp_path / "exported")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([10, 49])
    with torch.no_grad():
        ours = run.ema_model(x, t)
        theirs = pipeline.unet(x, t).sample
    assert relative_difference(ours, theirs) <= 1e-5
    # One DDPM step from t = 30 with the same noise: diffusers' scheduler against ddpm's Algorithm 2.
    scheduler = pipeline.scheduler
    assert scheduler.config.num_train_timesteps == 50 and scheduler.config.variance_type == "fixed_large"
    scheduler.set_timesteps(50)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eps = pipeline.unet(x, torch.tensor([30, 30])).sample
        theirs = scheduler.step(eps, 30, x, generator=torch.Generator().manual_seed(3)).prev_sample
    from ddpm.diffusion import denoise
    from ddpm.sampling import ddpm_step

    t_batch = torch.tensor([30, 30])
    schedule = run.schedule
    with torch.no_grad():
        pred = denoise(schedule, run.ema_model(x, t_batch), x, t_batch, "eps", clip_denoised=True)
    c1, c2 = schedule.posterior_mean_coef1[30], schedule.posterior_mean_coef2[30]
    ours = ddpm_step(x, pred.pred_x0, c1, c2, schedule.betas[30], noise)
    assert relative_difference(theirs, ours) <= 1e-5


def test_import_export_import_keeps_every_weight(tmp_path, capsys):
    random_unet(**dict(SMALL, **{k: PAPER[k] for k in ("downsample_padding", "flip_sin_to_cos", "freq_shift",
                                                        "norm_eps")}, attention_head_dim=4, num_class_embeds=3),
                ).save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(variance_type="fixed_large").save_pretrained(tmp_path / "unet")  # flat, as google's
    assert main(["import", str(tmp_path / "unet"), "--out", str(tmp_path / "first")]) == 0
    assert main(["export", str(tmp_path / "first"), "--out", str(tmp_path / "exported")]) == 0
    assert main(["import", str(tmp_path / "exported"), "--out", str(tmp_path / "second")]) == 0
    first, second = ddpm.load(tmp_path / "first"), ddpm.load(tmp_path / "second")
    assert first.classes == second.classes == ("0", "1", "2")
    a, b = first.ema_model.state_dict(), second.ema_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first.config.sample.sampler == "ddpm" and first.config.sample.variance == "fixed_large"
    exported = json.loads((tmp_path / "exported" / "unet" / "config.json").read_text())
    assert exported["num_class_embeds"] == 4 and exported["attention_head_dim"] == 4  # "no class" kept as a row
    x = first.sample(2, labels=[0, 2], guidance=2.0, sampler="heun", steps=3)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()
    # An imported run has weights, no training state: resuming it is refused in one line.
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(tmp_path / "first"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "was made by ddpm import" in err and "no training state to resume" in err and err.count("\n") == 1, err


def test_bad_folders_and_configs_are_one_line(tmp_path, capsys):
    random_unet(**SMALL).save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "unet")
    cases = {}
    cases["not a diffusers folder"] = (tmp_path / "empty", "is not a diffusers folder: no config.json")
    (tmp_path / "empty").mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tmp_path / "unet" / "config.json").read_text())
    cases["missing weights"] = (no_weights, "has no weights: expected diffusion_pytorch_model.safetensors")
    no_scheduler = tmp_path / "no_scheduler"
    random_unet(**SMALL).save_pretrained(no_scheduler)
    cases["missing scheduler"] = (no_scheduler, "has no scheduler config (scheduler/scheduler_config.json or "
                                                "scheduler_config.json)")
    for key, value, text in (("resnet_time_scale_shift", "scale_shift", "resnet_time_scale_shift = \"scale_shift\""),
                             ("down_block_types", ["SkipDownBlock2D", "AttnDownBlock2D"], "down_block_types = "),
                             ("_class_name", "UNet2DConditionModel", "ddpm imports UNet2DModel only")):
        folder = tmp_path / key
        folder.mkdir()
        config = json.loads((tmp_path / "unet" / "config.json").read_text())
        config[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(
            (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").read_bytes())
        cases[key] = (folder, text)
    small = build_config("square-fast", {"diffusion": {"num_steps": 20}, "train": {
        "steps": 1, "batch_size": 4, "checkpoint_every": 1, "sample_every": 0, "eval_every": 0, "tensorboard": False}})
    run_dir = train(small, tmp_path / "tutorial", progress=False, log=lambda message: None).run_dir
    cases["a ddpm run"] = (run_dir, "is a ddpm run directory, not a diffusers folder")
    for name, (folder, text) in cases.items():
        code = main(["import", str(folder), "--out", str(tmp_path / f"out-{folder.name}")])
        err = capsys.readouterr().err
        assert code == 2 and text in err and err.count("\n") == 1, (name, err)
        assert not (tmp_path / f"out-{folder.name}").exists(), name
    # A network diffusers' UNet2DModel cannot express, and an occupied --out.
    exportable = _trained_run(tmp_path)
    for args, text in (([str(run_dir), "--out", str(tmp_path / "x")], "'unet-small', which diffusers' UNet2DModel "
                                                                       "cannot express"),
                       ([str(exportable), "--out", str(tmp_path / "unet")], "exists and is not an empty folder")):
        code = main(["export", *args])
        err = capsys.readouterr().err
        assert code == 2 and text in err and err.count("\n") == 1, err


def test_a_ddim_pipeline_imports_with_its_own_walk(tmp_path):
    reference = random_unet(**SMALL)
    diffusers.DDIMPipeline(unet=reference, scheduler=diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2",
                                                                             prediction_type="v_prediction")
                           ).save_pretrained(tmp_path / "pipe")
    assert main(["import", str(tmp_path / "pipe"), "--out", str(tmp_path / "run")]) == 0
    run = ddpm.load(tmp_path / "run")
    assert run.config.sample.sampler == "ddim" and run.config.diffusion.schedule == "cosine"
    assert run.config.diffusion.prediction == "v"
    # diffusers' cosine betas are float32 computations of the same formula as ddpm's float64 ones.
    scheduler = diffusers.DDIMScheduler.from_pretrained(tmp_path / "pipe", subfolder="scheduler")
    assert torch.allclose(run.schedule.alphas_cumprod, scheduler.alphas_cumprod, rtol=1e-4, atol=1e-6)
