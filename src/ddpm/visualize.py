"""Pictures of images, trajectories, point clouds and curves, drawn with Pillow alone (no matplotlib).

Images come in the package's convention, float (N, C, H, W) in [-1, 1] with C 1 or 3; everything
here writes PNG (or GIF) files and never changes its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from ddpm.validation import whole_number

__all__ = [
    "to_uint8", "make_grid", "save_grid", "save_images", "denoising_strip", "save_animation",
    "scatter_png", "plot_curves",
]

# Scatter limits: (low, high) for both axes, or ((x_low, x_high), (y_low, y_high)).
Limits = tuple[float, float] | tuple[tuple[float, float], tuple[float, float]]

MIN_GRID_WIDTH = 256  # save_grid upscales small images until the images of a row span this many pixels
_BACKGROUND = (255, 255, 255)
_FRAME = (160, 160, 160)
_AXIS = (225, 225, 225)
_TEXT = (30, 30, 30)
_DOT = (31, 119, 180)
# Line colours for plot_curves, in order (the familiar "tab10" hues).
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


# ---------------------------------------------------------------------------------------------
# Images


def _check_images(images: Tensor, what: str = "images") -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a tensor (N, C, H, W) with C 1 or 3; got {shape}")


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, C) on the CPU: v = (x + 1) * 127.5, clamped to
    [0, 255], rounded half up (floor(v + 0.5)).

    -1 -> 0, 1 -> 255, 0 -> 128 (127.5 is the only exact tie a float input can produce, since
    (x + 1) * 255 is an odd integer only at x = 0). Values outside [-1, 1] are clamped; NaN raises
    ValueError, because a black pixel would hide a diverged model.
    """
    _check_images(images)
    x = images.detach().to("cpu", torch.float32)
    if torch.isnan(x).any():
        raise ValueError(f"images contain {int(torch.isnan(x).sum())} NaN values; nothing to draw")
    v = ((x + 1) * 127.5).clamp(0, 255)
    return torch.floor(v + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _grid_array(pixels: np.ndarray, nrow: int, padding: int, pad: int) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows*H + (rows+1)*padding, nrow*W + (nrow+1)*padding, C)."""
    n, h, w, c = pixels.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * h + (rows + 1) * padding, nrow * w + (nrow + 1) * padding, c), pad, dtype=np.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid


def _to_pil(array: np.ndarray) -> Image.Image:
    """uint8 (H, W, 1) or (H, W, 3) -> a PIL image in mode "L" or "RGB"."""
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array, "L" if array.shape[-1] == 1 else "RGB")


def _check_layout(n: int, nrow: int | None, padding: int) -> int:
    """The validated number of images per row (default: ceil(sqrt(N)), a near-square grid)."""
    if n == 0:
        raise ValueError("images is empty; a grid needs at least one image")
    whole_number("padding", padding, 0)
    if nrow is None:
        return math.ceil(math.sqrt(n))
    whole_number("nrow", nrow, 1)
    return min(nrow, n)


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0,
              scale: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images in [-1, 1] into one PIL image ("L" for C=1, "RGB" for C=3).

    nrow: images per row (default ceil(sqrt(N))). padding: pixels between and around the images,
    coloured pad_value (in [-1, 1]: 1 is white). scale: integer nearest-neighbour upscaling of each
    image before tiling (the padding stays thin). Size: width nrow*W*scale + (nrow+1)*padding,
    height rows*H*scale + (rows+1)*padding with rows = ceil(N / nrow).
    """
    _check_images(images)
    nrow = _check_layout(images.shape[0], nrow, padding)
    whole_number("scale", scale, 1)
    pixels = to_uint8(images).numpy()
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    pad = int(to_uint8(torch.full((1, 1, 1, 1), float(pad_value)))[0, 0, 0, 0])
    return _to_pil(_grid_array(pixels, nrow, padding, pad))


def _auto_scale(width: int, nrow: int) -> int:
    """The smallest integer upscale making a row of nrow images of this width at least MIN_GRID_WIDTH."""
    return max(1, math.ceil(MIN_GRID_WIDTH / (nrow * width)))


def _prepare_path(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int | None = None,
              padding: int = 2) -> None:
    """Save (N, C, H, W) images in [-1, 1] as one grid image (format from the suffix, e.g. .png).

    scale None upscales small images (nearest neighbour, integer factor) so a row is at least
    MIN_GRID_WIDTH = 256 pixels wide: an 8x8 or 28x28 grid is visible as is.
    """
    _check_images(images)
    nrow = _check_layout(images.shape[0], nrow, padding)
    scale = _auto_scale(images.shape[-1], nrow) if scale is None else scale
    make_grid(images, nrow=nrow, padding=padding, scale=scale).save(_prepare_path(path))


def save_labelled_rows(rows: Mapping[str, Tensor], path: str | Path, scale: int | None = None,
                       padding: int = 2) -> None:
    """Save one row of images per label, the label written to its left: e.g. the same seeds drawn by
    several samplers. Each value is (N, C, H, W) in [-1, 1], all of one shape."""
    if not rows:
        raise ValueError("save_labelled_rows needs at least one row")
    shapes = {tuple(images.shape) for images in rows.values()}
    if len(shapes) != 1:
        raise ValueError(f"every row must have one shape; got {sorted(shapes)}")
    first = next(iter(rows.values()))
    _check_images(first)
    scale = _auto_scale(first.shape[-1], first.shape[0]) if scale is None else scale
    strips = [make_grid(images, nrow=images.shape[0], padding=padding, scale=scale) for images in rows.values()]
    font = _font(14)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(_text_size(measure, label, font)[0] for label in rows) + 12
    width, height = strips[0].width, strips[0].height
    canvas = Image.new("RGB", (label_width + width, height * len(strips)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, (label, strip) in enumerate(zip(rows, strips)):
        canvas.paste(strip.convert("RGB"), (label_width, k * height))
        _draw_text(draw, (label_width - 6, k * height + height / 2), label, font, align="right")
    canvas.save(_prepare_path(path))


def save_images(images: Tensor, directory: str | Path, start: int = 0) -> list[Path]:
    """Write each image of (N, C, H, W) in [-1, 1] as its own PNG: ``{start:06d}.png``, ... .

    ``start`` numbers the first file, so batches can be written one after another. Returns the paths.
    """
    _check_images(images)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(to_uint8(images).numpy()):
        path = directory / f"{start + i:06d}.png"
        _to_pil(pixels).save(path)
        paths.append(path)
    return paths


def _check_frames(frames: Sequence[Tensor]) -> None:
    if len(frames) == 0:
        raise ValueError("frames is empty; give at least one (N, C, H, W) tensor")
    for i, frame in enumerate(frames):
        _check_images(frame, f"frames[{i}]")
        if frame.shape != frames[0].shape:
            raise ValueError(
                f"frames[{i}] has shape {tuple(frame.shape)}, frames[0] has {tuple(frames[0].shape)}; all must match"
            )


def denoising_strip(frames: Sequence[Tensor], path: str | Path, columns: int | None = None,
                    scale: int | None = None) -> None:
    """Save a grid whose row i follows image i through time: one column per chosen frame.

    frames: K tensors (N, C, H, W), from the noisiest to the clean one. columns: how many frames to
    show, evenly spaced and always including the first and the last (None: all K).
    """
    _check_frames(frames)
    k = len(frames)
    if columns is not None:
        whole_number("columns", columns, 1)
    count = k if columns is None else min(columns, k)
    chosen = sorted({round(i * (k - 1) / max(count - 1, 1)) for i in range(count)})
    stacked = torch.stack([frames[i].detach().cpu() for i in chosen], dim=1)  # (N, columns, C, H, W)
    save_grid(stacked.flatten(0, 1), path, nrow=len(chosen), scale=scale)


def save_animation(frames: Sequence[Tensor], path: str | Path, duration_ms: int = 100,
                   nrow: int | None = None, scale: int | None = None) -> None:
    """Save an animated GIF (looping) with one grid of (N, C, H, W) images per frame.

    Each frame shows for duration_ms. Pillow merges consecutive identical frames into one
    longer frame, so the file can hold fewer frames than given when nothing changed between them.
    """
    _check_frames(frames)
    whole_number("duration_ms", duration_ms, 1)
    nrow = _check_layout(frames[0].shape[0], nrow, 2)
    scale = _auto_scale(frames[0].shape[-1], nrow) if scale is None else scale
    grids = [make_grid(frame, nrow=nrow, scale=scale) for frame in frames]
    grids[0].save(_prepare_path(path), save_all=True, append_images=grids[1:], duration=duration_ms, loop=0)


# ---------------------------------------------------------------------------------------------
# Plots


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at this size; its fixed-size bitmap font where FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # no FreeType, or Pillow < 10.1 without the size argument
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font,
               align: str = "center", fill: tuple[int, int, int] = _TEXT) -> None:
    """Draw text centred vertically on xy[1]; horizontally centred on, ending at or starting at xy[0]."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    width, height = right - left, bottom - top
    x = {"center": xy[0] - width / 2, "right": xy[0] - width, "left": xy[0]}[align] - left
    draw.text((x, xy[1] - height / 2 - top), text, fill=fill, font=font)


def _robust_range(values: np.ndarray) -> tuple[float, float]:
    """(low, high) for one axis of finite values: their 0.5-99.5% range, narrowed to at most the
    5-95% range widened by half its width on each side.

    The narrowing matters only when more than 0.5% of the points lie far out (10 of 500 do, in a
    sample with a few diverged points): such points would set the 0.5-99.5% range alone. For data
    without far outliers the 0.5-99.5% range is the narrower one (for a normal: 2.6 against 3.3
    standard deviations from the mean).
    """
    q_low, q5, q95, q_high = np.quantile(values, [0.005, 0.05, 0.95, 0.995])
    reach = (q95 - q5) / 2
    return float(max(q_low, q5 - reach)), float(min(q_high, q95 + reach))


def _scatter_limits(point_sets: Sequence[Tensor],
                    limits: Limits | None) -> tuple[tuple[float, float], tuple[float, float]]:
    """((xlo, xhi), (ylo, yhi)): as given, or a square window around the robust range of each axis
    (_robust_range, over the finite points of all sets together) with a 5% margin."""
    if limits is None:
        arrays = [p.detach().to("cpu", torch.float64).numpy() for p in point_sets]
        everything = np.concatenate([a[np.isfinite(a).all(axis=1)] for a in arrays])
        if len(everything) == 0:
            return (-1.0, 1.0), (-1.0, 1.0)
        (xlo, xhi), (ylo, yhi) = _robust_range(everything[:, 0]), _robust_range(everything[:, 1])
        centre = ((xlo + xhi) / 2, (ylo + yhi) / 2)
        # One half-width for both axes keeps circles round.
        half = max(xhi - xlo, yhi - ylo) / 2 * 1.05
        if half <= 1e-9 * max(1.0, abs(centre[0]), abs(centre[1])):  # (nearly) one point: a window around it
            half = 0.1 * max(abs(centre[0]), abs(centre[1])) or 1.0
        return (centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half)
    if all(isinstance(v, (int, float)) for v in limits):
        limits = (limits, limits)
    (xlo, xhi), (ylo, yhi) = limits
    if not (xlo < xhi and ylo < yhi):
        raise ValueError(f"limits={limits!r} is not allowed; each axis needs low < high")
    return (float(xlo), float(xhi)), (float(ylo), float(yhi))


def _scatter_ticks(lo: float, hi: float, max_ticks: int) -> list[tuple[float, str]]:
    """(value, label) of the round values in [lo, hi]: the multiples of a step of 1, 2 or 5 x 10^k,
    the smallest such step that gives at most max_ticks of them. max_ticks >= 4 gives at least one
    (the step is then shorter than the window), max_ticks >= 6 at least two."""
    step = _nice_step(hi - lo, max_ticks)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    # Clamped so a tick at the window's edge cannot round outside it.
    return [(min(max(k * step, lo), hi), _tick_label(k * step, step)) for k in range(first, last + 1)]


def _point_pixels(points: Tensor, xlim: tuple[float, float], ylim: tuple[float, float], size: int) -> np.ndarray:
    """(N, 2) data coordinates -> (M, 2) integer (column, row) in a size x size panel, y pointing up.

    Pixel j covers [j, j+1) of the scaled coordinate, so the centre of the limits lands on pixel
    size // 2. Points outside the limits (and non-finite ones) are dropped.
    """
    p = points.detach().to("cpu", torch.float64).numpy()
    u = (p[:, 0] - xlim[0]) / (xlim[1] - xlim[0]) * size
    v = (ylim[1] - p[:, 1]) / (ylim[1] - ylim[0]) * size
    inside = (u >= 0) & (u <= size) & (v >= 0) & (v <= size)  # also false for NaN
    cols = np.minimum(np.floor(u[inside]), size - 1).astype(np.int64)  # the far edge belongs to the last pixel
    rows = np.minimum(np.floor(v[inside]), size - 1).astype(np.int64)
    return np.stack([cols, rows], axis=1)


def _draw_panel(canvas: np.ndarray, pixels: np.ndarray, origin: tuple[int, int], size: int) -> None:
    """Paint 3x3-pixel dots at (column, row) pixels of the panel whose top-left is origin."""
    x0, y0 = origin
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            cols = np.clip(pixels[:, 0] + dx, 0, size - 1) + x0
            rows = np.clip(pixels[:, 1] + dy, 0, size - 1) + y0
            canvas[rows, cols] = _DOT


def _spaced_ticks(lo: float, hi: float, max_ticks: int, size: int, draw: ImageDraw.ImageDraw,
                  font) -> list[tuple[float, str]]:
    """_scatter_ticks for a horizontal axis of size pixels: the most ticks, up to max_ticks (>= 4),
    whose labels side by side leave a gap; never none, though the labels may then touch."""
    chosen = _scatter_ticks(lo, hi, max_ticks)
    for count in range(max_ticks, 1, -1):
        ticks = _scatter_ticks(lo, hi, count)
        if not ticks:  # so few that no round value is inside
            break
        chosen = ticks
        widest = max(_text_size(draw, label, font)[0] for _, label in ticks)
        if len(ticks) == 1 or (ticks[1][0] - ticks[0][0]) / (hi - lo) * size >= widest + 6:
            break
    return chosen


def _outside_count(points: Tensor, xlim: tuple[float, float], ylim: tuple[float, float], size: int) -> int:
    """How many of the points (N, 2) a panel leaves out: those outside the window, and non-finite ones."""
    return len(points) - len(_point_pixels(points, xlim, ylim, size))


def _outside_note(outside: int, total: int, width: int, draw: ImageDraw.ImageDraw, font) -> str:
    """The line under a panel's title, in the longest wording that fits in width pixels."""
    wordings = [f"{outside} of {total} points outside the window", f"{outside} of {total} outside"]
    return next((w for w in wordings if _text_size(draw, w, font)[0] <= width), f"{outside}/{total} outside")


def scatter_png(point_sets: Sequence[Tensor], path: str | Path, titles: Sequence[str] | None = None,
                size: int = 256, limits: Limits | None = None) -> None:
    """Save side-by-side scatter plots of 2-D point sets, e.g. samples next to data.

    point_sets: tensors (N_i, 2). titles: one per set, written above its panel. size: each panel's
    plot area is size x size pixels. limits: (low, high) for both axes, ((xlo, xhi), (ylo, yhi)), or
    None for a window chosen from the data: per axis the 0.5-99.5% range of all sets together (but
    no wider than the 5-95% range plus half its width each side, so a few far outliers cannot squeeze
    the rest into a dot), made square (circles stay round) with a 5% margin. Every panel shares the
    window, so panels compare directly.

    Points outside the window (and non-finite ones) are not drawn; a second line under the panel's
    title says how many ("12 of 2000 points outside the window"). Both axes have ticks with labels at
    round values inside the window, and light lines mark x = 0 and y = 0 when they are in view.
    """
    if len(point_sets) == 0:
        raise ValueError("point_sets is empty; give at least one (N, 2) tensor")
    sets = [torch.as_tensor(p) for p in point_sets]
    for i, p in enumerate(sets):
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"point_sets[{i}] must be (N, 2); got shape {tuple(p.shape)}")
    if titles is not None and len(titles) != len(sets):
        raise ValueError(f"titles has {len(titles)} entries for {len(sets)} point sets; give one per set")
    whole_number("size", size, 16)
    xlim, ylim = _scatter_limits(sets, limits)
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    max_ticks = min(10, max(5, size // 40 + 1))  # at most about one label per 40 pixels
    x_ticks, y_ticks = _spaced_ticks(*xlim, max_ticks, size, probe, font), _scatter_ticks(*ylim, max_ticks)
    tick, gap = 4, 3  # tick mark length; space between a mark and its label
    label_width = max(_text_size(probe, label, font)[0] for _, label in y_ticks)
    left, right, top, bottom = max(40, label_width + tick + gap + 6), 16, 40, tick + gap + 17
    title_y, note_y = 12, 27  # centres of the two lines above a panel: its title, and what it leaves out
    panel_width = left + size + right
    image = Image.new("RGB", (panel_width * len(sets), top + size + bottom), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    origins = [(i * panel_width + left, top) for i in range(len(sets))]
    # Pixel columns of the x ticks and rows of the y ticks, by the same mapping as the points. The
    # same for x = 0 and y = 0, clamped into the window in float64 (in float32 the clamped value can
    # round outside it and be dropped).
    nearest_zero = [min(max(0.0, xlim[0]), xlim[1]), min(max(0.0, ylim[0]), ylim[1])]
    marks = [[x, ylim[0]] for x, _ in x_ticks] + [[xlim[0], y] for y, _ in y_ticks] + [nearest_zero]
    pixels = _point_pixels(torch.tensor(marks, dtype=torch.float64), xlim, ylim, size)
    columns, rows, axes = pixels[:len(x_ticks), 0], pixels[len(x_ticks):-1, 1], pixels[-1]
    for i, (x0, y0) in enumerate(origins):
        if xlim[0] <= 0 <= xlim[1]:
            draw.line([(x0 + axes[0], y0), (x0 + axes[0], y0 + size - 1)], fill=_AXIS)
        if ylim[0] <= 0 <= ylim[1]:
            draw.line([(x0, y0 + axes[1]), (x0 + size - 1, y0 + axes[1])], fill=_AXIS)
        draw.rectangle([x0 - 1, y0 - 1, x0 + size, y0 + size], outline=_FRAME)
        for column, (_, label) in zip(columns, x_ticks):  # marks below the frame, labels under them
            draw.line([(x0 + column, y0 + size + 1), (x0 + column, y0 + size + tick)], fill=_TEXT)
            _draw_text(draw, (x0 + column + 0.5, y0 + size + tick + gap + 6), label, font)
        for row, (_, label) in zip(rows, y_ticks):  # marks left of the frame, labels left of them
            draw.line([(x0 - 1 - tick, y0 + row), (x0 - 2, y0 + row)], fill=_TEXT)
            _draw_text(draw, (x0 - 1 - tick - gap, y0 + row + 0.5), label, font, align="right")
        if titles is not None:
            _draw_text(draw, (x0 + size / 2, title_y), str(titles[i]), font)
        outside = _outside_count(sets[i], xlim, ylim, size)
        if outside:  # centred on the plot area: it may reach as far into each margin as the narrower (right) one
            note = _outside_note(outside, len(sets[i]), size + 2 * right - 4, draw, font)
            _draw_text(draw, (x0 + size / 2, note_y), note, font, fill=_PALETTE[3])
    canvas = np.array(image)
    for p, origin in zip(sets, origins):
        _draw_panel(canvas, _point_pixels(p, xlim, ylim, size), origin, size)
    Image.fromarray(canvas).save(_prepare_path(path))


def _nice_step(span: float, max_ticks: int) -> float:
    """The smallest 1, 2 or 5 times a power of ten that covers span in at most max_ticks - 1 steps."""
    raw = span / max(max_ticks - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-9))


def _linear_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Evenly spaced round ticks whose first is <= lo and last >= hi (the axis spans them)."""
    if hi - lo <= 1e-12 * max(abs(lo), abs(hi), 1.0):
        pad = abs(lo) * 0.1 or 1.0  # a flat series still needs a visible axis
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, max_ticks)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [k * step for k in range(first, last + 1)]


def _tick_label(value: float, step: float) -> str:
    if 1e-3 <= abs(step) and abs(value) < 1e7:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        return f"{value:.{decimals}f}"
    return f"{value:.3g}"


def _check_series(series: Mapping[str, Sequence[tuple[float, float]]], log_y: bool) -> dict[str, np.ndarray]:
    """Series as float64 (M, 2) arrays, finite points only; raises ValueError on what cannot be drawn."""
    arrays = {}
    for name, points in series.items():
        array = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else np.empty((0, 2))
        array = array[np.isfinite(array).all(axis=1)]
        if log_y and (array[:, 1] <= 0).any():
            bad = array[array[:, 1] <= 0][0]
            raise ValueError(f"log_y needs positive y values; series {name!r} has y={bad[1]:g} at x={bad[0]:g}")
        arrays[str(name)] = array
    if not any(len(a) for a in arrays.values()):
        raise ValueError("series holds no finite (x, y) points; nothing to plot")
    return arrays


def plot_curves(series: Mapping[str, Sequence[tuple[float, float]]], path: str | Path, title: str = "",
                xlabel: str = "", ylabel: str = "", log_y: bool = False,
                size: tuple[int, int] = (640, 400)) -> None:
    """Save a line plot: one line per named series of (x, y) points, with axes, ticks and a legend.

    Non-finite points are left out. log_y plots log10(y) with ticks at powers of ten (the axis is
    widened to whole decades) and needs every y > 0.
    """
    arrays = _check_series(series, log_y)
    width, height = size
    left, right, top, bottom = 72, 16, 32, 48
    if width - left - right < 64 or height - top - bottom < 64:
        raise ValueError(f"size={size!r} is too small; use at least {(left + right + 64, top + bottom + 64)}")
    points = np.concatenate([a for a in arrays.values() if len(a)])
    ys = np.log10(points[:, 1]) if log_y else points[:, 1]
    x_ticks = _linear_ticks(float(points[:, 0].min()), float(points[:, 0].max()))
    if log_y:
        low, high = math.floor(ys.min()), math.ceil(ys.max())
        y_ticks = [float(k) for k in range(low, max(high, low + 1) + 1)]
    else:
        y_ticks = _linear_ticks(float(ys.min()), float(ys.max()))
    (x_lo, x_hi), (y_lo, y_hi) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_pixel(x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
        px = left + (x - x_lo) / (x_hi - x_lo) * plot_w
        py = top + (y_hi - y) / (y_hi - y_lo) * plot_h
        return list(zip(px.tolist(), py.tolist()))

    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font()
    x_step, y_step = x_ticks[1] - x_ticks[0], y_ticks[1] - y_ticks[0]
    for x in x_ticks:
        (px, _), = to_pixel(np.array([x]), np.array([y_lo]))
        draw.line([(px, top), (px, top + plot_h)], fill=_AXIS)
        _draw_text(draw, (px, top + plot_h + 12), _tick_label(x, x_step), font)
    for y in y_ticks:
        (_, py), = to_pixel(np.array([x_lo]), np.array([y]))
        draw.line([(left, py), (left + plot_w, py)], fill=_AXIS)
        label = f"{10.0 ** y:g}" if log_y else _tick_label(y, y_step)
        _draw_text(draw, (left - 6, py), label, font, align="right")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=_FRAME)
    for i, array in enumerate(arrays.values()):
        colour = _PALETTE[i % len(_PALETTE)]
        line = to_pixel(array[:, 0], np.log10(array[:, 1]) if log_y else array[:, 1])
        if len(line) == 1:
            (px, py), = line
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        elif line:
            draw.line(line, fill=colour, width=2, joint="curve")
    _draw_legend(draw, list(arrays), (left + plot_w - 8, top + 8), font)
    _draw_text(draw, (left + plot_w / 2, top / 2), title, _font(14))
    _draw_text(draw, (left + plot_w / 2, height - 14), xlabel, font)
    if ylabel:
        _draw_vertical_text(image, ylabel, (14, top + plot_h / 2), font)
    image.save(_prepare_path(path))


def _draw_legend(draw: ImageDraw.ImageDraw, names: list[str], top_right: tuple[float, float], font) -> None:
    """A boxed legend with a colour swatch per series, anchored at the plot's top-right corner."""
    line_height, swatch = 16, 18
    text_width = max(_text_size(draw, name, font)[0] for name in names)
    box_w, box_h = swatch + 10 + text_width + 8, line_height * len(names) + 8
    x1, y0 = top_right
    x0 = x1 - box_w
    draw.rectangle([x0, y0, x1, y0 + box_h], fill=_BACKGROUND, outline=_FRAME)
    for i, name in enumerate(names):
        y = y0 + 4 + line_height * i + line_height / 2
        draw.line([(x0 + 6, y), (x0 + 6 + swatch, y)], fill=_PALETTE[i % len(_PALETTE)], width=3)
        _draw_text(draw, (x0 + 6 + swatch + 6, y), name, font, align="left")


def _draw_vertical_text(image: Image.Image, text: str, centre: tuple[float, float], font) -> None:
    """Draw text rotated a quarter turn anticlockwise (reading bottom to top), centred on centre."""
    probe = ImageDraw.Draw(image)
    w, h = _text_size(probe, text, font)
    label = Image.new("RGB", (w + 4, h + 6), _BACKGROUND)
    _draw_text(ImageDraw.Draw(label), ((w + 4) / 2, (h + 6) / 2), text, font)
    label = label.rotate(90, expand=True)
    image.paste(label, (round(centre[0] - label.width / 2), round(centre[1] - label.height / 2)))
