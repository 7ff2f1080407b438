"""Bad input through the real command line: every mistake exits 2 with one line naming the problem,
and no run directory or user file loses anything.

Each case is a small setup function (``@case``) that builds its files in a fresh folder and returns
the command to run, and a test of the same name that checks the outcome. The commands are
independent, and importing torch makes each one cost about two seconds, so the module fixture
``outcomes`` runs them all (only the selected ones) two at a time before the tests look at them.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ddpm.config import build_config
from ddpm.build import build_model_for

# The real MNIST files in ../shared beside the checkout (CI provides them; a missing folder fails loudly).
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"

# A run of a few seconds: the square preset's small U-Net, T = 20, three checkpoints.
TINY = ["--steps", "3", "--num-steps", "20", "--sample-steps", "5", "--num-samples", "2", "--batch-size", "8",
        "--sample-every", "0", "--eval-every", "0", "--checkpoint-every", "1", "--no-tensorboard", "--quiet"]
T = 20


# --- running commands -----------------------------------------------------------------------------

@dataclass
class Command:
    """One ``ddpm`` invocation in ``cwd``; ``watch``: folders whose files must not change."""

    args: list[str]
    cwd: Path
    watch: list[Path] = field(default_factory=list)
    python_c: str | None = None  # run this program (which calls ddpm.cli.main) instead of `-m ddpm`


@dataclass
class Outcome:
    command: Command
    returncode: int
    stdout: str
    stderr: str
    before: dict[Path, dict[str, bytes | None]]
    after: dict[Path, dict[str, bytes | None]]
    seconds: float


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under root, by relative path."""
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def environment(cwd: Path) -> dict[str, str]:
    # DDPM_DATA keeps every command away from the user's download cache.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "DDPM_DATA": str(cwd / "cache")}


def run_command(command: Command) -> Outcome:
    before = {w: snapshot(w) for w in command.watch}
    started = time.perf_counter()
    program = ["-c", command.python_c] if command.python_c else ["-m", "ddpm"]
    result = subprocess.run([sys.executable, *program, *command.args], cwd=command.cwd,
                            env=environment(command.cwd), capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    after = {w: snapshot(w) for w in command.watch}
    assert "internal error" not in result.stderr, result.stderr  # a bug report, not an error message
    return Outcome(command, result.returncode, result.stdout, result.stderr, before, after, seconds)


def describe(outcome: Outcome) -> str:
    return (f"`ddpm {' '.join(outcome.command.args)}` exited {outcome.returncode} in {outcome.seconds:.1f} s\n"
            f"--- stdout ---\n{outcome.stdout}--- stderr ---\n{outcome.stderr}")


def assert_one_line_error(outcome: Outcome, *words: str, code: int = 2) -> None:
    """Exit ``code``, stderr one non-empty line with no traceback, naming each of ``words``."""
    assert "Traceback" not in outcome.stderr, describe(outcome)
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"stderr is not one line\n{describe(outcome)}"
    assert ": error: ddpm" not in lines[0], f"the program named twice\n{describe(outcome)}"
    assert outcome.returncode == code, describe(outcome)
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in the message\n{describe(outcome)}"


def assert_untouched(outcome: Outcome) -> None:
    """The watched folders hold exactly the files and bytes they held before the command."""
    for folder in outcome.command.watch:
        before, after = outcome.before[folder], outcome.after[folder]
        added = sorted(set(after) - set(before))
        removed = sorted(set(before) - set(after))
        changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
        assert not (added or removed or changed), (
            f"{folder} changed: added {added}, removed {removed}, changed {changed}\n{describe(outcome)}")


# --- the cases --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trained:
    square: Path  # square-fast, unet-small, T = 20, checkpoints at steps 1..3
    other_weights: Path  # a model.safetensors of the gradients preset's network (mlp-toy, 3x5x5)

    def copy(self, to: Path) -> Path:
        """A copy of the square run to damage."""
        shutil.copytree(self.square, to)
        return to


Setup = Callable[[Path, Trained], "Command"]
CASES: dict[str, Setup] = {}


def case(setup: Setup) -> Setup:
    """Register ``setup_NAME``; the test ``test_NAME`` reads its outcome."""
    CASES[setup.__name__.removeprefix("setup_")] = setup
    return setup


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("trained")
    outcome = run_command(Command(["train", "--preset", "square-fast", "--out", "square", *TINY], root))
    assert outcome.returncode == 0, describe(outcome)
    # What a gradients-preset run saves as model.safetensors, made here rather than by a second run
    # (each command costs seconds).
    other = build_model_for(build_config("gradients", {"diffusion": {"num_steps": T}}), "image", (3, 5, 5), seed=0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, root / "other.safetensors")
    return Trained(root / "square", root / "other.safetensors")


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, trained) -> dict[str, Outcome]:
    selected = {item.name.removeprefix("test_") for item in request.session.items}
    commands = {}
    for name, setup in CASES.items():
        if name in selected:
            commands[name] = setup(tmp_path_factory.mktemp(name), trained)
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(commands, pool.map(run_command, commands.values())))


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def write_pngs(folder: Path, count: int, size: int = 8) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(folder / f"img{i:02d}.png")


# --- data -------------------------------------------------------------------------------------------

@case
def setup_missing_data_path(tmp: Path, trained: Trained) -> Command:
    return Command(["train", "--data", "no_such_folder", "--out", "run", *TINY], tmp)


def test_missing_data_path(outcomes):
    outcome = outcomes["missing_data_path"]
    assert_one_line_error(outcome, "no_such_folder")
    assert not (outcome.command.cwd / "run").exists(), "a failed start left a run directory behind"


@case
def setup_empty_data_folder(tmp: Path, trained: Trained) -> Command:
    (tmp / "empty").mkdir()
    return Command(["train", "--data", "empty", "--out", "run", *TINY], tmp)


def test_empty_data_folder(outcomes):
    outcome = outcomes["empty_data_folder"]
    assert_one_line_error(outcome, "empty", "no images")
    assert not (outcome.command.cwd / "run").exists(), "a failed start left a run directory behind"


@case
def setup_some_images_corrupt(tmp: Path, trained: Trained) -> Command:
    write_pngs(tmp / "pics", 10)
    (tmp / "pics" / "bad1.png").write_bytes(b"this is not a png")
    good = (tmp / "pics" / "img00.png").read_bytes()
    (tmp / "pics" / "bad2.png").write_bytes(good[: len(good) // 2])  # truncated
    return Command(["train", "--data", "pics", "--out", "run", *TINY], tmp, watch=[tmp / "pics"])


def test_some_images_corrupt(outcomes):
    """Training goes on without the unreadable files and says how many it skipped."""
    outcome = outcomes["some_images_corrupt"]
    assert outcome.returncode == 0, describe(outcome)
    assert "Traceback" not in outcome.stderr
    assert "skipped 2 of 12" in outcome.stdout + outcome.stderr, describe(outcome)
    assert (outcome.command.cwd / "run" / "checkpoints" / "latest").is_file()
    assert_untouched(outcome)


@case
def setup_all_images_corrupt(tmp: Path, trained: Trained) -> Command:
    (tmp / "pics").mkdir()
    for i in range(3):
        (tmp / "pics" / f"bad{i}.png").write_bytes(b"\x89PNG garbage " * (i + 1))
    return Command(["train", "--data", "pics", "--out", "run", *TINY], tmp, watch=[tmp / "pics"])


def test_all_images_corrupt(outcomes):
    outcome = outcomes["all_images_corrupt"]
    assert_one_line_error(outcome, "none of the 3")
    assert_untouched(outcome)
    assert not (outcome.command.cwd / "run").exists(), "a failed start left a run directory behind"


@case
def setup_truncated_mnist_gz(tmp: Path, trained: Trained) -> Command:
    assert SHARED_MNIST.is_dir(), f"the MNIST files are missing at {SHARED_MNIST}"
    folder = tmp / "mnist_files"
    folder.mkdir()
    for source in SHARED_MNIST.glob("*.gz"):
        shutil.copyfile(source, folder / source.name)
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
    return Command(["train", "--preset", "mnist", "--data", "mnist_files", "--out", "run", *TINY], tmp,
                   watch=[folder])


def test_truncated_mnist_gz(outcomes):
    outcome = outcomes["truncated_mnist_gz"]
    assert_one_line_error(outcome, "train-images-idx3-ubyte.gz")
    assert_untouched(outcome)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@case
def setup_truncated_mnist_idx(tmp: Path, trained: Trained) -> Command:
    folder = tmp / "mnist_raw"
    folder.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    labels = np.arange(10, dtype=np.uint8)
    for split in ("train", "t10k"):
        (folder / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images, 2051))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 2049))
    raw = (folder / "train-images-idx3-ubyte").read_bytes()
    (folder / "train-images-idx3-ubyte").write_bytes(raw[: 16 + 5 * 28 * 28 + 100])  # 5.1 of 10 images
    return Command(["train", "--preset", "mnist", "--data", "mnist_raw", "--out", "run", *TINY], tmp,
                   watch=[folder])


def test_truncated_mnist_idx(outcomes):
    outcome = outcomes["truncated_mnist_idx"]
    assert_one_line_error(outcome, "train-images-idx3-ubyte", "truncated")
    assert_untouched(outcome)


@case
def setup_truncated_cifar_batch(tmp: Path, trained: Trained) -> Command:
    folder = tmp / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), b"labels": list(range(10))}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    raw = (folder / "data_batch_1").read_bytes()
    (folder / "data_batch_1").write_bytes(raw[: len(raw) // 2])
    return Command(["train", "--data", "cifar-10-batches-py", "--image-size", "8", "--channels", "1",
                    "--out", "run", *TINY], tmp, watch=[folder])


def test_truncated_cifar_batch(outcomes):
    outcome = outcomes["truncated_cifar_batch"]
    assert_one_line_error(outcome, "data_batch_1")
    assert_untouched(outcome)


# The download path cannot reach a mirror offline, so this program swaps urlopen for one that serves
# wrong bytes, then runs the real command line: the md5 check is what must catch it.
_WRONG_BYTES_SERVER = """
import io, sys
import ddpm.data.download as download
download.urlopen = lambda url, timeout=None: io.BytesIO(b"these are not the MNIST bytes")
from ddpm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@case
def setup_download_checksum_mismatch(tmp: Path, trained: Trained) -> Command:
    (tmp / "cache").mkdir()
    return Command(["train", "--preset", "mnist", "--out", "run", *TINY], tmp, python_c=_WRONG_BYTES_SERVER)


def test_download_checksum_mismatch(outcomes):
    outcome = outcomes["download_checksum_mismatch"]
    assert_one_line_error(outcome, "checksum mismatch", "md5")
    cached = outcome.command.cwd / "cache"
    assert [p for p in cached.rglob("*") if p.is_file()] == [], "a download that failed its md5 was kept"


@case
def setup_corrupt_cached_mnist(tmp: Path, trained: Trained) -> Command:
    assert SHARED_MNIST.is_dir(), f"the MNIST files are missing at {SHARED_MNIST}"
    folder = tmp / "cache" / "mnist"
    folder.mkdir(parents=True)
    for source in SHARED_MNIST.glob("*.gz"):
        shutil.copyfile(source, folder / source.name)
    labels = folder / "train-labels-idx1-ubyte.gz"
    raw = bytearray(labels.read_bytes())
    raw[100] ^= 0xFF  # no longer the published md5
    labels.write_bytes(bytes(raw))
    return Command(["train", "--preset", "mnist", "--out", "run", *TINY], tmp, watch=[tmp / "cache"])


def test_corrupt_cached_mnist(outcomes):
    outcome = outcomes["corrupt_cached_mnist"]
    assert_one_line_error(outcome, "train-labels-idx1-ubyte.gz")
    assert_untouched(outcome)


# --- checkpoints ------------------------------------------------------------------------------------

def truncate_weights(run: Path) -> None:
    weights = latest(run) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@case
def setup_truncated_checkpoint_sample(tmp: Path, trained: Trained) -> Command:
    run = trained.copy(tmp / "run")
    truncate_weights(run)
    return Command(["sample", "run", "--num", "2", "--quiet"], tmp, watch=[run])


def test_truncated_checkpoint_sample(outcomes):
    outcome = outcomes["truncated_checkpoint_sample"]
    assert_one_line_error(outcome, "model.safetensors")
    assert_untouched(outcome)


@case
def setup_truncated_checkpoint_resume(tmp: Path, trained: Trained) -> Command:
    run = trained.copy(tmp / "run")
    truncate_weights(run)
    return Command(["train", "--resume", "--out", "run", *TINY, "--steps", "5"], tmp, watch=[run])


def test_truncated_checkpoint_resume(outcomes):
    outcome = outcomes["truncated_checkpoint_resume"]
    assert_one_line_error(outcome, "model.safetensors")
    assert_untouched(outcome)


def swap_in_other_weights(trained: Trained, run: Path) -> None:
    shutil.copyfile(trained.other_weights, latest(run) / "model.safetensors")


@case
def setup_other_architecture_sample(tmp: Path, trained: Trained) -> Command:
    run = trained.copy(tmp / "run")
    swap_in_other_weights(trained, run)
    return Command(["sample", "run", "--num", "2", "--quiet"], tmp, watch=[run])


def test_other_architecture_sample(outcomes):
    outcome = outcomes["other_architecture_sample"]
    assert_one_line_error(outcome, "different architecture")
    assert_untouched(outcome)


@case
def setup_other_architecture_resume(tmp: Path, trained: Trained) -> Command:
    run = trained.copy(tmp / "run")
    swap_in_other_weights(trained, run)
    return Command(["train", "--resume", "--out", "run", *TINY, "--steps", "5"], tmp, watch=[run])


def test_other_architecture_resume(outcomes):
    outcome = outcomes["other_architecture_resume"]
    assert_one_line_error(outcome, "different architecture")
    assert_untouched(outcome)


# --- config and flag values -------------------------------------------------------------------------

@case
def setup_config_unknown_key(tmp: Path, trained: Trained) -> Command:
    (tmp / "run.toml").write_text("[train]\nsteps = 3\nlearning_rate = 0.001\n", encoding="utf-8")
    return Command(["train", "--config", "run.toml", "--out", "run", *TINY], tmp)


def test_config_unknown_key(outcomes):
    outcome = outcomes["config_unknown_key"]
    assert_one_line_error(outcome, "unknown key", "learning_rate")
    assert not (outcome.command.cwd / "run").exists()


# name -> (flags, words the message must contain)
BAD_VALUES = {
    "steps_zero": (["--steps", "0"], ["steps"]),
    "batch_size_negative": (["--batch-size", "-4"], ["batch"]),
    "lr_not_a_number": (["--lr", "abc"], ["lr", "abc"]),
    "unknown_preset": (["--preset", "nonesuch"], ["preset", "nonesuch"]),
    "unknown_sampler": (["--sampler", "euler2"], ["sampler", "euler2"]),
}


def _bad_value_case(name: str, flags: list[str]) -> None:
    def setup(tmp: Path, trained: Trained) -> Command:
        # The bad flag comes last, so it wins over TINY's value of the same flag.
        return Command(["train", "--out", "run", *TINY, *flags], tmp)
    setup.__name__ = f"setup_{name}"
    case(setup)


for _name, (_flags, _) in BAD_VALUES.items():
    _bad_value_case(_name, _flags)


def check_bad_value(outcomes, name: str) -> None:
    outcome = outcomes[name]
    assert_one_line_error(outcome, *BAD_VALUES[name][1])
    assert not (outcome.command.cwd / "run").exists()


def test_steps_zero(outcomes):
    check_bad_value(outcomes, "steps_zero")


def test_batch_size_negative(outcomes):
    check_bad_value(outcomes, "batch_size_negative")


def test_lr_not_a_number(outcomes):
    check_bad_value(outcomes, "lr_not_a_number")


def test_unknown_preset(outcomes):
    check_bad_value(outcomes, "unknown_preset")


def test_unknown_sampler(outcomes):
    check_bad_value(outcomes, "unknown_sampler")


@case
def setup_image_size_model_cannot_take(tmp: Path, trained: Trained) -> Command:
    write_pngs(tmp / "pics", 10, size=32)
    return Command(["train", "--preset", "mnist", "--data", "pics", "--image-size", "30", "--out", "run", *TINY],
                   tmp, watch=[tmp / "pics"])


def test_image_size_model_cannot_take(outcomes):
    outcome = outcomes["image_size_model_cannot_take"]
    assert_one_line_error(outcome, "image_size", "30")
    assert_untouched(outcome)
    assert not (outcome.command.cwd / "run").exists(), "a failed start left a run directory behind"


@case
def setup_data_note_then_error(tmp: Path, trained: Trained) -> Command:
    write_pngs(tmp / "pics", 4, size=32)  # too few to hold any out: the loader has a note to print
    (tmp / "pics" / "bad.png").write_bytes(b"not a png")  # and another
    return Command(["train", "--preset", "mnist", "--data", "pics", "--image-size", "30", "--out", "run", *TINY],
                   tmp, watch=[tmp / "pics"])


def test_data_note_then_error(outcomes):
    """A run that cannot start reports only why: the data loader's notes are not printed before it."""
    outcome = outcomes["data_note_then_error"]
    assert_one_line_error(outcome, "image_size", "30")
    assert_untouched(outcome)


# --- run directories --------------------------------------------------------------------------------

@case
def setup_reuse_run_dir_without_resume(tmp: Path, trained: Trained) -> Command:
    run = trained.copy(tmp / "run")
    return Command(["train", "--out", "run", *TINY], tmp, watch=[run])


def test_reuse_run_dir_without_resume(outcomes):
    outcome = outcomes["reuse_run_dir_without_resume"]
    assert_one_line_error(outcome, "not empty", "--resume")
    assert_untouched(outcome)


@case
def setup_overwrite_non_ddpm_folder(tmp: Path, trained: Trained) -> Command:
    folder = tmp / "thesis"
    (folder / "chapters").mkdir(parents=True)
    (folder / "chapters" / "one.tex").write_text("\\chapter{One}\n", encoding="utf-8")
    (folder / "notes.txt").write_text("do not delete\n", encoding="utf-8")
    return Command(["train", "--out", "thesis", "--overwrite", *TINY], tmp, watch=[folder])


def test_overwrite_non_ddpm_folder(outcomes):
    outcome = outcomes["overwrite_non_ddpm_folder"]
    assert_one_line_error(outcome, "--overwrite", "nothing was deleted")
    assert_untouched(outcome)


@case
def setup_overwrite_with_missing_data(tmp: Path, trained: Trained) -> Command:
    run = trained.copy(tmp / "run")
    return Command(["train", "--out", "run", "--overwrite", "--data", "nothere.npy", *TINY], tmp, watch=[run])


def test_overwrite_with_missing_data(outcomes):
    # The run to replace is deleted only once the new one is ready to start.
    outcome = outcomes["overwrite_with_missing_data"]
    assert_one_line_error(outcome, "nothere.npy")
    assert_untouched(outcome)


@case
def setup_eta_with_the_ddpm_sampler(tmp: Path, trained: Trained) -> Command:
    return Command(["train", "--out", "run", "--sampler", "ddpm", "--eta", "0.5", *TINY], tmp)


def test_eta_with_the_ddpm_sampler(outcomes):
    # Refused before training, not at the final sample grid after a checkpoint was written.
    outcome = outcomes["eta_with_the_ddpm_sampler"]
    assert_one_line_error(outcome, "--eta 0.5", "ddim")
    assert not (outcome.command.cwd / "run").exists()


@case
def setup_resume_names_another_preset(tmp: Path, trained: Trained) -> Command:
    run = trained.copy(tmp / "run")
    return Command(["train", "--resume", "--out", "run", "--preset", "toy2d", *TINY, "--steps", "5"], tmp,
                   watch=[run])


def test_resume_names_another_preset(outcomes):
    outcome = outcomes["resume_names_another_preset"]
    assert_one_line_error(outcome, "preset", "square-fast", "resum")
    assert_untouched(outcome)


@case
def setup_resume_changes_lr(tmp: Path, trained: Trained) -> Command:
    run = trained.copy(tmp / "run")
    return Command(["train", "--resume", "--out", "run", *TINY, "--steps", "5", "--lr", "0.5"], tmp, watch=[run])


def test_resume_changes_lr(outcomes):
    outcome = outcomes["resume_changes_lr"]
    assert_one_line_error(outcome, "train.lr", "resum")
    assert_untouched(outcome)


# --- pickles are never executed ---------------------------------------------------------------------

class Planted:
    """Unpickling this calls open(marker, "w"): the marker file appearing means the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickles(run: Path, marker: Path, *, weights: bool = False) -> None:
    checkpoint = latest(run)
    torch.save({"step": 3, "payload": Planted(marker)}, checkpoint / "state.pt")
    (checkpoint / "optimizer.pt").write_bytes(pickle.dumps(Planted(marker)))
    (checkpoint / "state.safetensors").write_bytes(pickle.dumps({"rng": Planted(marker)}))
    if weights:
        for name in ("model.safetensors", "ema.safetensors"):
            (checkpoint / name).write_bytes(pickle.dumps(Planted(marker)))


def test_planted_pickle_is_live(tmp_path):
    """The payload used below does create its marker when something unpickles it."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Planted(marker))).close()
    assert marker.exists()


@case
def setup_pickle_sample(tmp: Path, trained: Trained) -> Command:
    run = trained.copy(tmp / "run")
    plant_pickles(run, tmp / "PWNED")
    return Command(["sample", "run", "--num", "2", "--out", "out.png", "--quiet"], tmp, watch=[run])


def test_pickle_sample(outcomes):
    """Sampling reads no pickle: it ignores the stray .pt files, or fails in one line."""
    outcome = outcomes["pickle_sample"]
    assert not (outcome.command.cwd / "PWNED").exists(), "a pickle in the checkpoint was executed"
    if outcome.returncode != 0:
        assert_one_line_error(outcome)
    assert "Traceback" not in outcome.stderr
    assert_untouched(outcome)


@case
def setup_pickle_resume(tmp: Path, trained: Trained) -> Command:
    run = trained.copy(tmp / "run")
    plant_pickles(run, tmp / "PWNED")
    return Command(["train", "--resume", "--out", "run", *TINY, "--steps", "5"], tmp, watch=[run])


def test_pickle_resume(outcomes):
    """state.safetensors holding pickle bytes is refused as damaged, never unpickled."""
    outcome = outcomes["pickle_resume"]
    assert not (outcome.command.cwd / "PWNED").exists(), "a pickle in the checkpoint was executed"
    assert_one_line_error(outcome, "state.safetensors")
    assert_untouched(outcome)


@case
def setup_pickle_weights_sample(tmp: Path, trained: Trained) -> Command:
    run = trained.copy(tmp / "run")
    plant_pickles(run, tmp / "PWNED", weights=True)
    return Command(["sample", "run", "--num", "2", "--out", "out.png", "--quiet"], tmp, watch=[run])


def test_pickle_weights_sample(outcomes):
    outcome = outcomes["pickle_weights_sample"]
    assert not (outcome.command.cwd / "PWNED").exists(), "a pickle in the checkpoint was executed"
    assert_one_line_error(outcome, "model.safetensors")
    assert_untouched(outcome)
    assert not (outcome.command.cwd / "out.png").exists()


# --- ddpm sample's options --------------------------------------------------------------------------

@case
def setup_sample_out_exists(tmp: Path, trained: Trained) -> Command:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "holiday.png").write_bytes(b"my own picture")
    return Command(["sample", str(trained.square), "--num", "2", "--out", "mine/holiday.png", "--quiet"], tmp,
                   watch=[tmp / "mine", trained.square])


def test_sample_out_exists(outcomes):
    outcome = outcomes["sample_out_exists"]
    assert_one_line_error(outcome, "already exists", "--overwrite")
    assert_untouched(outcome)


@case
def setup_sample_out_txt(tmp: Path, trained: Trained) -> Command:
    return Command(["sample", str(trained.square), "--num", "2", "--out", "x.txt", "--quiet"], tmp,
                   watch=[trained.square])


def test_sample_out_txt(outcomes):
    outcome = outcomes["sample_out_txt"]
    assert_one_line_error(outcome, "x.txt")
    assert_untouched(outcome)
    assert not (outcome.command.cwd / "x.txt").exists()


@case
def setup_sample_trajectory_is_out(tmp: Path, trained: Trained) -> Command:
    return Command(["sample", str(trained.square), "--num", "2", "--out", "h.png", "--trajectory", "./h.png",
                    "--quiet"], tmp, watch=[trained.square])


def test_sample_trajectory_is_out(outcomes):
    outcome = outcomes["sample_trajectory_is_out"]
    assert_one_line_error(outcome, "--trajectory", "--out")
    assert not (outcome.command.cwd / "h.png").exists()


@case
def setup_sample_seed_out_of_range(tmp: Path, trained: Trained) -> Command:
    return Command(["sample", str(trained.square), "--seed", str(10**20), "--out", "x.png", "--quiet"], tmp,
                   watch=[trained.square])


def test_sample_seed_out_of_range(outcomes):
    outcome = outcomes["sample_seed_out_of_range"]
    assert_one_line_error(outcome, "--seed", str(10**20), "2**62")
    assert not (outcome.command.cwd / "x.png").exists()


@case
def setup_sample_on_a_missing_gpu(tmp: Path, trained: Trained) -> Command:
    return Command(["sample", str(trained.square), "--device", "cuda:7", "--out", "x.png", "--quiet"], tmp,
                   watch=[trained.square])


def test_sample_on_a_missing_gpu(outcomes):
    # Without CUDA (as on the CI machine): one line that names the flag, not train.device.
    outcome = outcomes["sample_on_a_missing_gpu"]
    assert_one_line_error(outcome, "--device", "cuda:7")
    assert "train.device" not in outcome.stderr


@case
def setup_sample_eta_too_large(tmp: Path, trained: Trained) -> Command:
    return Command(["sample", str(trained.square), "--num", "2", "--sampler", "ddim", "--eta", "2",
                    "--out", "x.png", "--quiet"], tmp, watch=[trained.square])


def test_sample_eta_too_large(outcomes):
    outcome = outcomes["sample_eta_too_large"]
    assert_one_line_error(outcome, "eta")
    assert not (outcome.command.cwd / "x.png").exists()


@case
def setup_sample_steps_above_T(tmp: Path, trained: Trained) -> Command:
    return Command(["sample", str(trained.square), "--num", "2", "--steps", str(T + 1), "--out", "x.png",
                    "--quiet"], tmp, watch=[trained.square])


def test_sample_steps_above_T(outcomes):
    outcome = outcomes["sample_steps_above_T"]
    assert_one_line_error(outcome, "--steps", str(T + 1), f"T = {T}")
    assert not (outcome.command.cwd / "x.png").exists()


@case
def setup_sample_unknown_sampler(tmp: Path, trained: Trained) -> Command:
    return Command(["sample", str(trained.square), "--num", "2", "--sampler", "euler2", "--out", "x.png",
                    "--quiet"], tmp)


def test_sample_unknown_sampler(outcomes):
    outcome = outcomes["sample_unknown_sampler"]
    assert_one_line_error(outcome, "sampler", "euler2")
    assert not (outcome.command.cwd / "x.png").exists()


def test_the_shared_run_was_never_modified(outcomes, trained):
    """Commands pointed at the shared run (read-only uses) left it as trained."""
    for outcome in outcomes.values():
        if trained.square in outcome.command.watch:
            assert_untouched(outcome)
