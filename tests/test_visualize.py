"""Tests of ddpm.visualize: the [-1, 1] -> uint8 mapping, grid arithmetic, and that every picture
is written as a file Pillow reads back with the expected size, frames and pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ddpm.visualize import (
    denoising_strip, make_grid, plot_curves, save_animation, save_grid, save_images, scatter_png, to_uint8,
)

DOT = (31, 119, 180)  # scatter_png's dot colour
FRAME = (160, 160, 160)  # scatter_png's panel frame
NOTE = (214, 39, 40)  # scatter_png's colour for the count of points left out


def test_to_uint8_mapping_is_exact():
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5, -0.5, -3.0, 7.0]).reshape(1, 1, 1, 7)
    # 127.5 (x = 0) rounds half up to 128; 191.25 -> 191; 63.75 -> 64; out of range clamps.
    assert to_uint8(x).flatten().tolist() == [0, 255, 128, 191, 64, 0, 255]
    every = torch.arange(256, dtype=torch.float32) / 127.5 - 1  # the exact image of each level
    assert to_uint8(every.reshape(1, 1, 1, 256)).flatten().tolist() == list(range(256))


def test_to_uint8_layout_and_errors():
    x = torch.linspace(-1, 1, 2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    out = to_uint8(x)
    assert out.shape == (2, 4, 5, 3) and out.dtype == torch.uint8
    assert torch.equal(out[1, 2, 3], to_uint8(x[1:2, :, 2:3, 3:4]).flatten())
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(torch.full((1, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\) with C 1 or 3"):
        to_uint8(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        to_uint8(torch.zeros(3, 4, 4))


def test_grid_size_arithmetic_and_placement():
    images = torch.linspace(-1, 1, 5)[:, None, None, None].expand(5, 1, 8, 10)  # H=8, W=10, flat values
    grid = make_grid(images, nrow=3, padding=2, pad_value=-1.0)
    assert grid.mode == "L" and grid.size == (3 * 10 + 4 * 2, 2 * 8 + 3 * 2)
    pixels = np.asarray(grid)
    levels = to_uint8(images[:, :, :1, :1]).flatten().tolist()
    assert pixels[2, 2] == levels[0] and pixels[2 + 8 + 2, 2 + 10 + 2] == levels[4]  # image 4: row 1, col 1
    assert pixels[0, 0] == 0 and pixels[12, 26] == 0  # padding, and the empty sixth slot
    rgb = make_grid(torch.zeros(4, 3, 6, 6), padding=1, scale=3)  # nrow defaults to ceil(sqrt(4)) = 2
    assert rgb.mode == "RGB" and rgb.size == (2 * 18 + 3, 2 * 18 + 3)
    assert make_grid(torch.zeros(3, 1, 4, 4), nrow=10, padding=0).size == (12, 4)


def test_save_grid_upscales_small_images(tmp_path):
    square = -torch.ones(1, 1, 8, 8)
    square[..., 2:6, 2:6] = 1
    save_grid(square, tmp_path / "sq.png", padding=0)
    with Image.open(tmp_path / "sq.png") as image:
        assert image.size == (256, 256)  # 8 px upscaled 32x
        pixels = np.asarray(image)
    assert pixels[128, 128] == 255 and pixels[10, 10] == 0 and pixels[2 * 32, 2 * 32] == 255
    save_grid(torch.zeros(16, 1, 28, 28), tmp_path / "sub" / "mnist.png")
    with Image.open(tmp_path / "sub" / "mnist.png") as image:
        assert image.size == (4 * 28 * 3 + 5 * 2,) * 2  # 4 per row, 112 px -> scale 3
    save_grid(torch.zeros(4, 3, 64, 64), tmp_path / "big.png", scale=1)
    with Image.open(tmp_path / "big.png") as image:
        assert image.size == (2 * 64 + 3 * 2,) * 2


def test_save_images_one_png_each(tmp_path):
    images = torch.rand(3, 3, 5, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1
    paths = save_images(images, tmp_path / "out", start=5)
    assert [p.name for p in paths] == ["000005.png", "000006.png", "000007.png"]
    for path, expected in zip(paths, to_uint8(images)):
        with Image.open(path) as image:
            assert image.size == (7, 5) and np.array_equal(np.asarray(image), expected.numpy())


def _constant_frames(k: int, n: int = 2, size: int = 4) -> list[torch.Tensor]:
    """k frames of n gray images, frame i filled with its own level, so columns are recognisable."""
    return [torch.full((n, 1, size, size), -1 + 2 * i / (k - 1)) for i in range(k)]


def test_denoising_strip_rows_are_images_columns_are_steps(tmp_path):
    frames = _constant_frames(10)
    denoising_strip(frames, tmp_path / "strip.png", columns=4, scale=1)
    with Image.open(tmp_path / "strip.png") as image:
        assert image.size == (4 * 4 + 5 * 2, 2 * 4 + 3 * 2)
        pixels = np.asarray(image)
    chosen = [0, 3, 6, 9]  # evenly spaced, first and last included
    for column, k in enumerate(chosen):
        expected = int(to_uint8(frames[k][:1, :, :1, :1]))
        for row in range(2):
            assert pixels[2 + row * 6, 2 + column * 6] == expected
    with pytest.raises(ValueError, match="all must match"):
        denoising_strip([torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4)], tmp_path / "bad.png")


def test_save_animation_frame_count(tmp_path):
    frames = _constant_frames(6, n=4)
    save_animation(frames, tmp_path / "anim.gif", duration_ms=80)
    with Image.open(tmp_path / "anim.gif") as gif:
        assert gif.n_frames == 6 and gif.info["duration"] == 80
        assert gif.size == make_grid(frames[0], scale=32).size  # 2 per row of 4 px -> scale 32


def _dot_centroid(pixels: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero((pixels == DOT).all(axis=-1))
    return float(cols.mean()), float(rows.mean())


def _frame_lines(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns holding a long run of frame colour: the panels' frames. (Anti-aliased text
    can hold a few pixels of that grey too.)"""
    frame = (pixels == FRAME).all(axis=-1)
    return np.nonzero(frame.sum(axis=1) >= 16)[0], np.nonzero(frame.sum(axis=0) >= 16)[0]


def _plot_area(pixels: np.ndarray) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the first panel's plot area: just inside its frame."""
    rows, cols = _frame_lines(pixels)
    return cols[0] + 1, rows[0] + 1, cols[1] - 1, rows[-1] - 1


def _scatter_pixels(points, path, **options) -> np.ndarray:
    scatter_png(points, path, **options)
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_scatter_places_points_where_the_limits_say(tmp_path):
    scatter_png([torch.zeros(1, 2)], tmp_path / "centre.png", size=64, limits=(-1.0, 1.0))
    with Image.open(tmp_path / "centre.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    left, top, right, bottom = _plot_area(pixels)
    assert (right - left + 1, bottom - top + 1) == (64, 64)
    assert _dot_centroid(pixels) == (left + 32, top + 32)  # the centre of the limits -> pixel size // 2
    # y points up: a point at the top-left corner of the limits lands at the area's top-left.
    scatter_png([torch.tensor([[-1.0, 1.0], [5.0, 5.0]])], tmp_path / "corner.png", size=64, limits=(-1.0, 1.0))
    with Image.open(tmp_path / "corner.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    x, y = _dot_centroid(pixels)  # the out-of-range point is not drawn
    assert (x, y) == (left + 0.5, top + 0.5)  # a 3x3 dot clipped to the area: 2x2 pixels


def test_scatter_of_points_away_from_the_origin(tmp_path):
    # Windows that leave out x = 0 and y = 0, which failed when the clamped zero rounded outside them
    # in float32; samples of data centred away from the origin give such windows.
    generator = torch.Generator().manual_seed(0)
    scatter_png([torch.rand(10, 2) + 3], tmp_path / "fixed.png", limits=(2.1, 4.3))
    for i in range(50):
        centre = torch.rand(2, generator=generator) * 10 - 5
        points = centre + 0.3 * torch.randn(20, 2, generator=generator)
        scatter_png([points], tmp_path / f"{i}.png")
    left, top, right, bottom = _plot_area(np.asarray(Image.open(tmp_path / "fixed.png").convert("RGB")))
    assert (right - left + 1, bottom - top + 1) == (256, 256)


def test_scatter_panels_titles_and_errors(tmp_path):
    sets = [torch.randn(500, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    scatter_png(sets, tmp_path / "three.png", titles=["data", "ddpm", "ddim"], size=100)
    with Image.open(tmp_path / "three.png") as image:
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    rows, cols = _frame_lines(pixels)
    assert len(rows) == 2 and len(cols) == 6  # three frames side by side, equal in size and spacing
    assert rows[1] - rows[0] == 101 and set(np.diff(cols)[::2]) == {101} and width % 3 == 0
    assert cols[2] - cols[0] == width // 3 and height > rows[1]
    assert (pixels[:24].min(axis=-1) < 100).any()  # dark title text above the panels
    assert (pixels == DOT).all(axis=-1).sum() > 300
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        scatter_png([torch.zeros(5, 3)], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="one per set"):
        scatter_png(sets, tmp_path / "bad.png", titles=["only one"])
    with pytest.raises(ValueError, match="low < high"):
        scatter_png(sets, tmp_path / "bad.png", limits=(1.0, -1.0))


def _with_far_outliers(n: int = 500, far: int = 10, seed: int = 0) -> torch.Tensor:
    """n points of N(0, I) whose first `far` are moved to norms 95-103 in random directions, as a few
    diverged samples are."""
    generator = torch.Generator().manual_seed(seed)
    points = torch.randn(n, 2, generator=generator)
    angle = torch.rand(far, generator=generator) * 2 * torch.pi
    radius = 95 + 8 * torch.rand(far, generator=generator)
    points[:far] = radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    return points


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scatter_window_is_not_set_by_far_outliers(tmp_path, seed):
    from ddpm import visualize

    points = _with_far_outliers(seed=seed)
    pixels = _scatter_pixels([points], tmp_path / "far.png", titles=["samples"])
    left, top, right, bottom = _plot_area(pixels)
    dots = (pixels[top:bottom + 1, left:right + 1] == DOT).all(axis=-1)
    rows, cols = np.nonzero(dots)
    assert (cols.max() - cols.min() + 1) * (rows.max() - rows.min() + 1) >= 0.5 * dots.size
    # The 490 are spread out, their 3x3 dots mostly apart (about 3800 pixels), not a blot of about
    # 100 pixels between the 10 (which, drawn at the window's edges, would pass the test above alone).
    assert dots.sum() >= 2000
    # The 10 are left out and counted, with few of the others; the count is written under the title.
    window = visualize._scatter_limits([points], None)
    assert visualize._outside_count(points[:10], *window, 256) == 10
    outside = visualize._outside_count(points, *window, 256)
    assert 10 <= outside <= 15
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    note = visualize._outside_note(outside, 500, 300, probe, visualize._font())
    assert note == f"{outside} of 500 points outside the window"
    assert (pixels[20:top - 1] == NOTE).all(axis=-1).any()  # drawn in its colour below the title
    # Non-finite points count as outside too; a panel with everything in view has no note line.
    assert visualize._outside_count(torch.tensor([[0.0, 0.0], [float("nan"), 0.0]]), (-1, 1), (-1, 1), 64) == 1
    pixels = _scatter_pixels([torch.zeros(3, 2)], tmp_path / "in.png", limits=(-1.0, 1.0))
    assert not (pixels == NOTE).all(axis=-1).any()


@pytest.mark.parametrize("window", [(-1.0, 1.0), (2.1, 4.3), (-0.0037, 0.0121), (95.0, 1234.0), (-3.45, 3.45),
                                    (0.1, 0.9), (-250.0, -249.2)])
@pytest.mark.parametrize("max_ticks", [4, 5, 7])
def test_scatter_ticks_are_round_values_inside_the_window(window, max_ticks):
    from ddpm import visualize

    lo, hi = window
    ticks = visualize._scatter_ticks(lo, hi, max_ticks)
    values = [value for value, _ in ticks]
    assert 1 <= len(values) <= max_ticks and (max_ticks < 6 or len(values) >= 2)
    assert all(lo <= value <= hi for value in values)
    step = values[1] - values[0] if len(values) > 1 else visualize._nice_step(hi - lo, max_ticks)
    assert np.allclose(np.diff(values), step, rtol=1e-9)
    mantissa = step / 10 ** np.floor(np.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-9  # a step of 1, 2 or 5 x 10^k
    assert all(abs(value / step - round(value / step)) < 1e-6 for value in values)  # at multiples of it
    for value, label in ticks:
        assert float(label) == pytest.approx(value, rel=1e-9, abs=step * 1e-9)


def test_scatter_has_tick_labels_on_both_axes(tmp_path):
    pixels = _scatter_pixels([torch.randn(200, 2, generator=torch.Generator().manual_seed(0))],
                             tmp_path / "ticks.png", titles=["data"])
    left, top, right, bottom = _plot_area(pixels)
    dark = pixels.min(axis=-1) < 100
    assert dark[top:bottom + 1, :left - 1].sum() > 50  # labels left of the plot area
    assert dark[bottom + 2:, left:right + 1].sum() > 50  # and below it
    # Tick marks: short dark lines touching the frame from outside.
    assert dark[bottom + 2, left:right + 1].sum() >= 3 and dark[top:bottom + 1, left - 2].sum() >= 3


def test_plot_curves_draws_lines_and_legend(tmp_path):
    series = {"train": [(i, 1.0 / (i + 1)) for i in range(100)], "eval": [(0, 0.9), (50, 0.05), (99, 0.02)]}
    plot_curves(series, tmp_path / "loss.png", title="loss", xlabel="step", ylabel="mse", log_y=True)
    plot_curves(series, tmp_path / "linear.png", size=(400, 300))
    for name, size in (("loss.png", (640, 400)), ("linear.png", (400, 300))):
        with Image.open(tmp_path / name) as image:
            assert image.size == size
            pixels = np.asarray(image.convert("RGB"))
        for colour in ((31, 119, 180), (255, 127, 14)):  # one line colour per series
            assert (pixels == colour).all(axis=-1).sum() > 20


def test_plot_curves_errors(tmp_path):
    with pytest.raises(ValueError, match="log_y needs positive y values; series 'loss' has y=0 at x=2"):
        plot_curves({"loss": [(1, 0.5), (2, 0.0)]}, tmp_path / "bad.png", log_y=True)
    with pytest.raises(ValueError, match="no finite"):
        plot_curves({"loss": [(1, float("nan"))]}, tmp_path / "bad.png")
    plot_curves({"flat": [(0, 1.0), (1, 1.0)], "one": [(0.5, 1.0)]}, tmp_path / "flat.png")  # degenerate ranges draw
    assert (tmp_path / "flat.png").is_file()
