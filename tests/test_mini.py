"""The embedded default (scale mini) and the text-only path of `generate` a newcomer runs after `make train`."""

from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from saber_pl.config import load_config
from saber_pl.generate import main, parse_args, request_from_args, resolve_checkpoint
from saber_pl.train import fit


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A one-step tiny saber_full run: a Saber model, trained with references, at flow shift 1 (as mini)."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = load_config("saber_full", "tiny", [f"logging.runs_dir={tmp}", "trainer.max_steps=1",
                                             "trainer.ckpt_every_n_steps=1", "flow.shift=1.0"])
    assert fit(cfg) == 0
    return cfg.run_dir


def test_generate_without_ref_is_text_only(run_dir: Path, tmp_path: Path) -> None:
    """`generate` with no --ref writes a T2V video and a grid with no reference row (it used to refuse)."""
    out = tmp_path / "t2v.mp4"
    assert main(["--ckpt", str(run_dir), "--prompt", "an object slides to the left on a striped background",
                 "--prompt", "a shape moves up on a plain background", "--steps", "2", "--out", str(out)]) == 0
    for i in range(2):
        with av.open(str(tmp_path / f"t2v_{i}.mp4")) as c:
            frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])
        assert frames.shape == (5, 32, 32, 3)  # the run's data section: 5 frames at 32x32
    grid = Image.open(tmp_path / "t2v_grid.png")
    assert grid.size == (4 * 34 + 2, 2 * 34 + 2)  # 2 videos x 4 frames, no reference row above them
    assert not list(tmp_path.glob("t2v_ref*.png"))  # no reference images were prepared or written


def test_generate_samples_with_the_runs_shift(run_dir: Path) -> None:
    """Without --shift, `generate` samples at the shift the run trained with (it used to take Wan's 5.0, a
    mismatch for a mini run trained at 1.0); --shift still overrides it."""
    source = resolve_checkpoint(run_dir)
    _, sampler = request_from_args(parse_args(["--ckpt", str(run_dir), "--prompt", "x"]), source)
    assert sampler.shift == 1.0
    _, sampler = request_from_args(parse_args(["--ckpt", str(run_dir), "--prompt", "x", "--shift", "3"]), source)
    assert sampler.shift == 3.0
