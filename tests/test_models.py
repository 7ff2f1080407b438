"""Contract tests every noise-prediction network must pass, plus per-architecture checks.

The contract (DESIGN.md): ``model(x_t, t)`` returns a tensor shaped like x_t, depends on t, trains
(every parameter gets a gradient, a fixed batch can be overfitted), rebuilds from its JSON config,
and is deterministic given a seed. Big presets are tested with small overrides, except where the
real size is the point (parameter counts).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpm.models import (
    PRESETS, build_model, build_model_from_dict, model_config_dict, preset_config, sinusoidal_embedding,
)

# Importing torch's compiler stack warns about torch.jit inside torch itself; nothing to act on here.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

# One small configuration per architecture (the paper's U-Net appears twice: a generic small
# config with attention at the finest level, and the real unet-mnist preset), with its sample shape.
CASES = {
    "mlp-toy": ({"channels": 1, "image_size": 8, "hidden_dim": 64}, (1, 8, 8)),
    "mlp-2d": ({"hidden_dim": 64}, (2,)),
    "unet-small": ({"in_channels": 1, "image_size": 8}, (1, 8, 8)),
    "unet": ({"in_channels": 3, "image_size": 16, "ch": 16, "channel_mult": (1, 2), "num_res_blocks": 1,
              "attention_resolutions": (16,), "num_groups": 8}, (3, 16, 16)),
    "unet-mnist": ({}, (1, 28, 28)),
}

PARAMETER_COUNTS = {  # golden values: a change here changes every saved checkpoint
    "mlp-toy": 804_624,
    "mlp-2d": 677_890,
    "unet-small": 135_473,
    "unet": 6_469_889,
    "unet-cifar10": 35_746_307,  # the paper's 35.7M; diffusers' google/ddpm-cifar10-32 has the same
    "unet-mnist": 1_112_801,
}


def make_inputs(sample_shape, batch=3, seed=0):
    """A fixed batch: x_t (B, *sample_shape) and t (B,) spread over 0..T-1."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *sample_shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def randomize_(model, seed=0):
    """Perturb every parameter, so zero-initialised layers stop hiding the rest of the network."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def build_case(name, seed=0, **extra):
    overrides, shape = CASES[name]
    return build_model(name, seed=seed, **{**overrides, **extra}), shape


# ---------------------------------------------------------------------------------------------
# Presets and configs
# ---------------------------------------------------------------------------------------------


def test_presets_lists_every_required_name_with_a_one_line_description():
    assert set(PARAMETER_COUNTS) <= set(PRESETS)
    for name, description in PRESETS.items():
        assert isinstance(description, str) and description and "\n" not in description, name


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_parameter_counts(name):
    model = build_model(name, device="meta")  # shapes only: the CIFAR-10 model costs nothing to count
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNTS[name]


def test_cifar10_preset_matches_the_paper_size():
    n = sum(p.numel() for p in build_model("unet-cifar10", device="meta").parameters())
    assert abs(n - 35.7e6) / 35.7e6 < 0.005


@pytest.mark.parametrize("name", sorted(PARAMETER_COUNTS))
def test_config_dict_is_json_and_rebuilds_the_same_config(name):
    model = build_model(name, device="meta")
    d = model_config_dict(model)
    assert d["preset"] == name
    assert json.loads(json.dumps(d)) == d
    rebuilt = build_model_from_dict(json.loads(json.dumps(d)), device="meta")
    assert rebuilt.config == model.config and type(rebuilt) is type(model)
    assert model_config_dict(rebuilt) == d


def test_config_dict_sees_through_torch_compile():
    model = build_model("mlp-2d")
    assert model_config_dict(torch.compile(model)) == model_config_dict(model)  # compiles nothing until called


def test_overrides_accept_json_lists_and_store_tuples():
    config = preset_config("unet", channel_mult=[1, 2], attention_resolutions=[14], dropout=0)
    assert config.channel_mult == (1, 2) and config.attention_resolutions == (14,)
    assert isinstance(config.dropout, float)
    assert preset_config("unet", attention_levels=[0, 2]).attention_levels == (0, 2)


def test_attention_goes_where_a_level_or_its_resolution_is_listed():
    config = preset_config("unet", attention_levels=(0,), attention_resolutions=(7,))  # 28, 14, 7
    assert [config.attention_at(level) for level in range(3)] == [True, False, True]
    # Overriding either field replaces the preset's placement: unet-mnist's level 2 is gone here.
    assert preset_config("unet-mnist", attention_resolutions=(14,)).attention_levels == ()
    assert preset_config("unet-mnist", attention_levels=(1,)).attention_levels == (1,)
    assert preset_config("unet-mnist", image_size=16).attention_levels == (2,)


# Where the U-Net presets had attention before it was stated by level: pixels at their native size.
ATTENTION_IN_PIXELS = {"unet": (14,), "unet-cifar10": (16,), "unet-mnist": (7,)}


@pytest.mark.parametrize("name", sorted(ATTENTION_IN_PIXELS))
def test_presets_by_level_build_the_network_they_built_in_pixels(name):
    # Same seed, same weights key for key, same outputs: checkpoints of these presets still load.
    before = build_model(name, seed=0, attention_levels=(), attention_resolutions=ATTENTION_IN_PIXELS[name])
    now = build_model(name, seed=0)
    assert now.config.attention_resolutions == ()
    assert list(now.state_dict()) == list(before.state_dict())
    for key, value in now.state_dict().items():
        assert torch.equal(value, before.state_dict()[key]), key
    assert sum(p.numel() for p in now.parameters()) == PARAMETER_COUNTS[name]
    x, t = make_inputs((now.config.in_channels, now.config.image_size, now.config.image_size), batch=1)
    with torch.no_grad():
        assert torch.equal(randomize_(now).eval()(x, t), randomize_(before).eval()(x, t))


@pytest.mark.parametrize("name, attention_resolutions", [
    *ATTENTION_IN_PIXELS.items(),
    ("unet-mnist", (14,)),  # a run that moved the attention (benchmarks/compare_diffusers.py does)
    ("unet-cifar10", ()),  # a run without attention outside the middle
])
def test_config_dicts_written_before_attention_levels_rebuild_the_same_network(name, attention_resolutions):
    # config.json files from before attention_levels existed hold attention_resolutions and no
    # attention_levels; they must give the network they were trained with, attention where they say only.
    old = model_config_dict(build_model(name, device="meta"))
    del old["attention_levels"]
    old["attention_resolutions"] = list(attention_resolutions)
    rebuilt = build_model_from_dict(old, device="meta")
    trained = build_model(name, device="meta", attention_levels=(), attention_resolutions=attention_resolutions)

    def shapes(model):
        return [(key, value.shape) for key, value in model.state_dict().items()]

    assert shapes(rebuilt) == shapes(trained)


# Square sizes each U-Net preset's levels divide (4 for three levels, 8 for unet-cifar10's four), and one
# they do not: a preset is a shape of network, not a size.
ANY_SIZE = {
    "unet": ([8, 16, 28, 48], 30),
    "unet-mnist": ([8, 16, 28, 48], 18),
    "unet-small": ([8, 16, 28, 48], 10),
    "unet-cifar10": ([8, 16, 32, 48], 28),
}


@pytest.mark.parametrize("name, size", [(name, size) for name, (sizes, _) in ANY_SIZE.items() for size in sizes])
def test_unet_presets_build_and_run_at_any_size_their_levels_divide(name, size):
    model = build_model(name, seed=0, image_size=size).eval()
    # Attention is by level, so the network (its weights' names and shapes) is the same at every size.
    native = build_model(name, device="meta")
    assert [(k, v.shape) for k, v in model.state_dict().items()] == [
        (k, v.shape) for k, v in native.state_dict().items()]
    x, t = make_inputs((model.config.in_channels, size, size), batch=1)
    with torch.no_grad():
        out = randomize_(model)(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(ANY_SIZE))
def test_unet_presets_refuse_a_size_their_levels_do_not_divide_in_one_line(name):
    size = ANY_SIZE[name][1]
    factor = 8 if name == "unet-cifar10" else 4
    with pytest.raises(ValueError) as info:
        build_model(name, device="meta", image_size=size)
    message = str(info.value)
    assert f"image_size={size} must be divisible by {factor}" in message and "\n" not in message


@pytest.mark.parametrize("preset, overrides, expected", [
    ("foo", {}, ["unknown preset 'foo'", "mlp-2d", "mlp-toy", "unet", "unet-cifar10", "unet-mnist", "unet-small"]),
    ("unet", {"chanels": 64}, ["unknown option 'chanels'", "allowed:", "ch", "channel_mult"]),
    ("mlp-2d", {"image_size": 28}, ["unknown option 'image_size'", "data_dim"]),
    ("unet", {"image_size": 30}, ["image_size=30", "divisible by 4"]),
    ("unet-cifar10", {"image_size": 36}, ["image_size=36", "divisible by 8"]),
    ("unet-small", {"image_size": 10}, ["image_size=10", "divisible by 4"]),
    ("unet", {"attention_resolutions": (16,)}, ["16 is never reached", "28, 14, 7"]),
    ("unet-cifar10", {"attention_resolutions": (16, 3)}, ["3 is never reached", "32, 16, 8, 4"]),
    ("unet", {"attention_levels": (1, 3)}, ["attention_levels=(1, 3)", "3 is not a level", "0 to 2"]),
    ("unet-mnist", {"attention_levels": (-1,)}, ["attention_levels=(-1,)", "-1 is not a level", "0 to 2"]),
    ("unet-cifar10", {"attention_levels": (4,)}, ["4 is not a level", "4 levels, numbered 0 to 3"]),
    ("unet", {"ch": 48}, ["num_groups=32", "48, 96"]),
    ("unet-mnist", {"ch": 36}, ["num_groups=8", "36, 72"]),
    ("unet", {"ch": 0}, ["ch = 0 is not allowed", "at least 1"]),
    ("unet", {"channel_mult": (1, 0)}, ["channel_mult = (1, 0) is not allowed", "at least 1"]),
    ("unet", {"channel_mult": ()}, ["channel_mult must list at least one level"]),
    ("unet", {"num_res_blocks": 0}, ["num_res_blocks = 0 is not allowed"]),
    ("unet", {"dropout": 1.5}, ["dropout = 1.5 is not allowed; it must be in [0, 1)"]),
    ("unet", {"ch": "64"}, ["ch = '64' is not allowed", "expected an integer"]),
    ("unet", {"ch": True}, ["ch = True is not allowed", "expected an integer"]),
    ("unet", {"out_channels": -3}, ["out_channels = -3 is not allowed", "at least 1"]),
    ("unet-small", {"channels": (16,)}, ["at least 2 levels"]),
    ("unet-small", {"num_steps": 0}, ["num_steps = 0 is not allowed"]),
    ("mlp-toy", {"image_size": -1}, ["image_size = -1 is not allowed"]),
    ("mlp-2d", {"norm": "batch"}, ["norm = 'batch' is not allowed", "layer", "none"]),
    ("mlp-2d", {"hidden_dim": 0}, ["hidden_dim = 0 is not allowed"]),
])
def test_bad_overrides_raise_value_error_saying_what_and_what_is_allowed(preset, overrides, expected):
    with pytest.raises(ValueError) as info:
        build_model(preset, device="meta", **overrides)
    for text in expected:
        assert text in str(info.value)


def test_build_model_from_dict_needs_a_preset():
    with pytest.raises(ValueError, match="'preset'"):
        build_model_from_dict({"ch": 32})


# ---------------------------------------------------------------------------------------------
# The model contract
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, overrides, shape", [
    ("mlp-toy", {"channels": 1, "image_size": 8}, (1, 8, 8)),
    ("mlp-toy", {"channels": 3, "image_size": 16}, (3, 16, 16)),
    ("mlp-toy", {"channels": 1, "image_size": 28}, (1, 28, 28)),
    ("mlp-toy", {"channels": 3, "image_size": 32}, (3, 32, 32)),
    ("mlp-2d", {}, (2,)),
    ("mlp-2d", {"data_dim": 5, "norm": "none"}, (5,)),
    ("unet-small", {"in_channels": 1, "image_size": 8}, (1, 8, 8)),
    ("unet-small", {"in_channels": 3, "image_size": 16}, (3, 16, 16)),
    ("unet-small", {}, (1, 28, 28)),
    ("unet-small", {"in_channels": 3, "image_size": 32}, (3, 32, 32)),
    ("unet", {"image_size": 8, "ch": 16, "num_groups": 8, "attention_resolutions": (4,)}, (1, 8, 8)),
    ("unet", {"in_channels": 3, "image_size": 16, "ch": 16, "num_groups": 8, "num_res_blocks": 1,
              "attention_resolutions": (8,)}, (3, 16, 16)),
    ("unet", {"ch": 16, "num_groups": 8, "num_res_blocks": 1}, (1, 28, 28)),
    ("unet", {"in_channels": 3, "image_size": 32, "ch": 16, "num_groups": 8, "num_res_blocks": 1,
              "channel_mult": (1, 2, 2, 2), "attention_resolutions": (16,)}, (3, 32, 32)),
    ("unet-mnist", {}, (1, 28, 28)),
    ("unet-cifar10", {}, (3, 32, 32)),
])
def test_output_shape_equals_input_shape(name, overrides, shape):
    model = randomize_(build_model(name, seed=0, **overrides)).eval()
    x, t = make_inputs(shape, batch=1 if name == "unet-cifar10" else 2)
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_unet_runs_at_other_sizes_than_it_was_built_for():
    model = build_model("unet", seed=0, ch=16, num_groups=8, num_res_blocks=1).eval()
    x, t = make_inputs((1, 16, 20))  # any H, W divisible by 4 for three levels
    with torch.no_grad():
        assert model(x, t).shape == x.shape


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_depends_on_t(name):
    model, shape = build_case(name)
    model = randomize_(model).eval()
    x, _ = make_inputs(shape, batch=2)
    with torch.no_grad():
        out_early = model(x, torch.tensor([0, 10]))
        out_late = model(x, torch.tensor([999, 500]))
    # Each sample separately: a model ignoring t for some rows must fail too.
    assert ((out_early - out_late).flatten(1).abs().amax(dim=1) > 1e-4).all()


@pytest.mark.parametrize("name", ["unet", "unet-mnist"])
def test_zero_init_makes_the_initial_prediction_zero(name):
    model, shape = build_case(name)
    x, t = make_inputs(shape)
    with torch.no_grad():
        assert torch.equal(model(x, t), torch.zeros_like(x))
        off, _ = build_case(name, zero_init=False)
        assert off(x, t).abs().amax() > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_parameter_receives_a_gradient(name):
    model, shape = build_case(name)
    x, t = make_inputs(shape, batch=4)
    target = torch.randn_like(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    # Zero-initialised layers block the gradient to everything before them on the first step; a
    # few optimiser steps open every path (output conv, then each block's last conv, then the rest).
    for _ in range(4):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x, t), target).backward()
        optimizer.step()
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x, t), target).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert p.grad.abs().amax() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_seed_gives_same_initial_weights(name):
    a, _ = build_case(name, seed=7)
    b, _ = build_case(name, seed=7)
    c, _ = build_case(name, seed=8)
    for (key, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), key
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


def test_seed_argument_leaves_the_global_rng_alone_and_manual_seed_also_works():
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    build_model("mlp-2d", seed=0)
    assert torch.equal(torch.rand(1), expected)
    torch.manual_seed(11)
    a = build_model("unet-small")
    torch.manual_seed(11)
    b = build_model("unet-small")
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name", sorted(CASES))
def test_safetensors_round_trip_into_a_model_rebuilt_from_json_reproduces_outputs(name, tmp_path):
    model, shape = build_case(name, seed=0)
    model = randomize_(model).eval()
    (tmp_path / "config.json").write_text(json.dumps(model_config_dict(model)))
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))

    fresh = build_model_from_dict(json.loads((tmp_path / "config.json").read_text()), seed=123).eval()
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    x, t = make_inputs(shape)
    with torch.no_grad():
        assert torch.equal(fresh(x, t), model(x, t))


@pytest.mark.parametrize("name", ["mlp-toy", "unet-small", "unet", "unet-mnist"])
def test_channels_last_matches_contiguous(name):
    model, shape = build_case(name)
    model = randomize_(model).eval()
    x, t = make_inputs(shape)
    with torch.no_grad():
        expected = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5 * expected.abs().amax().item())


@pytest.mark.parametrize("name", sorted(CASES))
def test_runs_in_bfloat16(name):
    model, shape = build_case(name)
    x, t = make_inputs(shape)
    with torch.no_grad():
        out = randomize_(model).to(torch.bfloat16).eval()(x.to(torch.bfloat16), t)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(CASES))
def test_dynamo_traces_the_whole_forward_without_graph_breaks(name):
    # explain() traces with TorchDynamo but compiles nothing, so it is quick on a CPU; the
    # benchmark script (--compile) checks torch.compile(fullgraph=True) end to end.
    torch._dynamo.reset()
    model, shape = build_case(name)
    x, t = make_inputs(shape)
    explanation = torch._dynamo.explain(model.eval())(x, t)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("name, x_shape, t_shape, message", [
    ("unet", (2, 3, 28, 28), (2,), "x_t must have shape (B, 1, *, *)"),
    ("unet", (2, 1, 30, 28), (2,), "multiple of 4"),
    ("unet", (2, 1, 28, 28), (3,), "t must have shape (B,) = (2,)"),
    ("unet-small", (1, 28, 28), (1,), "got (1, 28, 28)"),
    ("mlp-2d", (4, 3), (4,), "x_t must have shape (B, 2)"),
    ("mlp-toy", (2, 1, 16, 16), (2,), "x_t must have shape (B, 1, 28, 28)"),
    ("mlp-2d", (4, 2), (4, 1), "t must have shape (B,)"),
])
def test_wrong_input_shapes_raise_value_error(name, x_shape, t_shape, message):
    overrides = {"ch": 16, "num_groups": 8, "num_res_blocks": 1} if name == "unet" else {}
    model = build_model(name, **overrides)
    with pytest.raises(ValueError) as info:
        model(torch.zeros(x_shape), torch.zeros(t_shape, dtype=torch.long))
    assert message in str(info.value)


# A fixed batch, fixed t and fixed target noise; Adam regression of model(x_t, t) onto the target.
# The target is standard normal, so a bounded output (a sigmoid, a tanh) could not fit it.
OVERFIT = {  # name -> (extra overrides, learning rate, steps)
    "mlp-toy": ({}, 1e-3, 100),
    "mlp-2d": ({}, 3e-3, 200),
    "unet-small": ({}, 1e-2, 200),
    "unet": ({"dropout": 0.0}, 3e-3, 100),
    "unet-mnist": ({"dropout": 0.0, "image_size": 8}, 2e-3, 80),  # attention at level 2: 2x2
}


@pytest.mark.parametrize("name", sorted(OVERFIT))
def test_overfits_one_batch(name):
    extra, lr, steps = OVERFIT[name]
    model, shape = build_case(name, seed=0, **extra)
    if name == "unet-mnist":
        shape = (1, 8, 8)
    batch = 64 if name == "mlp-2d" else 4
    x, t = make_inputs(shape, batch=batch)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x, t), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, f"loss {losses[0]:.3g} -> {losses[-1]:.3g}"


# ---------------------------------------------------------------------------------------------
# The sinusoidal timestep embedding
# ---------------------------------------------------------------------------------------------


def test_sinusoidal_embedding_values():
    t = torch.tensor([0, 1, 37, 999])
    emb = sinusoidal_embedding(t, 8)
    assert emb.shape == (4, 8) and emb.dtype == torch.float32
    half = 4
    for row, step in enumerate(t.tolist()):
        for i in range(half):
            angle = step * 10000.0 ** (-i / half)
            assert emb[row, i].item() == pytest.approx(math.sin(angle), abs=1e-4)
            assert emb[row, half + i].item() == pytest.approx(math.cos(angle), abs=1e-4)


def test_sinusoidal_embedding_odd_dim_and_distinct_rows():
    emb = sinusoidal_embedding(torch.arange(1000), 7)
    assert emb.shape == (1000, 7) and torch.equal(emb[:, -1], torch.zeros(1000))
    assert torch.cdist(emb, emb).add(torch.eye(1000)).amin() > 1e-3  # every timestep is told apart


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_block_equals_softmax_attention_written_out(memory_format):
    # The block applies its 1x1 convs as matrix products and attention through a fused kernel; here
    # is the formula position by position in float64: q = Wq n + bq etc., softmax(q k^T / sqrt(C)) v.
    from ddpm.models.unet import AttentionBlock

    block = randomize_(AttentionBlock(16, num_groups=4, zero_init=True)).double()
    x = torch.randn(2, 16, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    n = torch.nn.functional.group_norm(x, 4, block.norm.weight, block.norm.bias, block.norm.eps)
    tokens = n.flatten(2).transpose(1, 2)  # (B, 30, 16)
    wq, wk, wv = block.qkv.weight[:, :, 0, 0].chunk(3)
    bq, bk, bv = block.qkv.bias.chunk(3)
    q, k, v = tokens @ wq.T + bq, tokens @ wk.T + bk, tokens @ wv.T + bv
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(16), dim=-1)  # (B, 30, 30), rows sum to 1
    out = (weights @ v) @ block.proj_out.weight[:, :, 0, 0].T + block.proj_out.bias
    expected = x + out.transpose(1, 2).reshape(x.shape)
    with torch.no_grad():
        got = block.to(memory_format=memory_format)(x.contiguous(memory_format=memory_format))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_dropout_zeroes_with_probability_p_and_scales_the_rest():
    from ddpm.models.unet import Dropout

    p, n = 0.1, 1_000_000
    x = torch.full((n,), 2.0)
    torch.manual_seed(0)
    y = Dropout(p).train()(x)
    kept = y != 0
    # The number dropped is Binomial(n, p): sd = sqrt(n p (1 - p)) = 300; allow 5 sd.
    assert abs((~kept).sum().item() - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert torch.equal(y[kept], torch.full_like(y[kept], 2.0 / (1 - p)))  # E[y] = x
    torch.manual_seed(0)
    assert torch.equal(Dropout(p).train()(x), y), "the mask comes from the global generator"
    assert torch.equal(Dropout(p).eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    # Channels-last input keeps its layout (the U-Nets' activations).
    image = torch.randn(2, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    assert Dropout(p).train()(image).is_contiguous(memory_format=torch.channels_last)


def test_dropout_rate_is_p_in_bf16_too():
    # Under bf16 autocast the activations are bf16; a bf16 draw compared with 0.1 drops 26/256 =
    # 0.1016 of them (over 10 sd too many here: it did, before the draw was made float32).
    from ddpm.models.unet import Dropout

    p, n = 0.1, 4_000_000
    torch.manual_seed(0)
    y = Dropout(p).train()(torch.ones(n, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert abs((y == 0).sum().item() - n * p) < 5 * math.sqrt(n * p * (1 - p))


def test_every_residual_block_gets_its_own_timestep_projection():
    # UNet.timestep_biases makes all blocks' temb_proj(temb) in one product and hands them out in
    # forward order; a hook on each block checks that what it received is its own projection.
    from ddpm.models.unet import ResidualBlock

    model = randomize_(build_model("unet", seed=0, ch=16, channel_mult=(1, 2, 2), num_groups=4)).double()
    blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
    assert len(model.res_blocks_in_order) == len(blocks) == len(set(map(id, model.res_blocks_in_order)))
    x, t = make_inputs((1, 28, 28), batch=3)
    temb = torch.nn.functional.silu(model.time_mlp(model.time_embed(t).double()))
    received = {}
    for block in blocks:
        block.register_forward_hook(lambda block, args, out: received.__setitem__(block, args[1]))
    with torch.no_grad():
        model(x.double(), t)
        assert received.keys() == set(blocks)
        for block in blocks:
            torch.testing.assert_close(received[block], block.temb_proj(temb), rtol=1e-12, atol=1e-12)


