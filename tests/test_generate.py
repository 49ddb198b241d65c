"""Reference-to-video generation (saber_pl.generate) and the eval CLI glue, end to end at scale tiny."""

import dataclasses
import json
import re
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from PIL import Image

import saber_pl.generate as generate
import saber_pl.wan as wan
from saber_pl.config import load_config
from saber_pl.eval.__main__ import main as eval_main
from saber_pl.export import export
from saber_pl.generate import (Generator, VideoSpec, main, model_limits, parse_args, request_from_args,
                               resolve_checkpoint, subject_size)
from saber_pl.references import Reference, ReferenceConfig, prepare_references
from saber_pl.sampling import SampleConfig, SamplerConfig, sample_latents
from saber_pl.train import fit

FAST = ["--steps", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A one-step tiny run with an EMA (so EMA and raw weights differ)."""
    tmp = tmp_path_factory.mktemp("runs")
    cfg = load_config("saber_full", "tiny", [f"logging.runs_dir={tmp}", "trainer.max_steps=1",
                                             "trainer.ckpt_every_n_steps=1", "optim.ema=true"])
    assert fit(cfg) == 0
    return cfg.run_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[..., :3] = rng.integers(0, 256, (40, 30, 3))
    rgba[8:32, 6:24, 3] = 255  # the subject; the rest is transparent
    Image.fromarray(rgba).save(d / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)).save(d / "photo.png")
    yy, xx = np.mgrid[:24, :36]
    Image.fromarray((((yy - 12) ** 2 + (xx - 18) ** 2) < 64).astype(np.uint8) * 255).save(d / "photo_mask.png")
    Image.fromarray(np.full((20, 28, 3), 70, np.uint8)).save(d / "scene.jpg")
    empty = rgba.copy()
    empty[..., 3] = 0
    Image.fromarray(empty).save(d / "empty.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return {p.stem: p for p in d.iterdir()}


def read_mp4(path: Path) -> tuple[np.ndarray, float, str, str]:
    """Decoded frames [F, H, W, 3], fps, codec and pixel format."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate), stream.codec_context.name, stream.codec_context.pix_fmt


def cli(run_dir: Path, images: dict[str, Path], out: Path, *extra: str) -> int:
    args = ["--ckpt", str(run_dir), "--ref", str(images["rgba"]), "--ref", str(images["photo"]),
            "--mask", "-", "--mask", str(images["photo_mask"]), "--prompt", "a red ball rolls", "--out", str(out)]
    return main(args + FAST + list(extra))


def test_cli_writes_video_grid_and_references(run_dir, images, tmp_path):
    assert cli(run_dir, images, tmp_path / "a.mp4", "--seed", "1", "--fps", "6") == 0
    frames, fps, codec, pix_fmt = read_mp4(tmp_path / "a.mp4")
    assert frames.shape == (5, 32, 32, 3)  # size and frame count default to the run's data section
    assert (fps, codec, pix_fmt) == (6.0, "h264", "yuv420p")
    grid = Image.open(tmp_path / "a_grid.png")
    assert grid.size == (4 * 34 + 2, 2 * 34 + 2)  # refs row + 4 frames of the one video, 2 px gaps
    for k in range(2):
        ref = np.asarray(Image.open(tmp_path / f"a_ref{k}.png"))
        mask = np.asarray(Image.open(tmp_path / f"a_ref{k}_mask.png")) > 127
        assert ref.shape == (32, 32, 3) and 0 < mask.mean() < 0.5
        assert (ref[~mask] == 128).all()  # gray outside the subject, as in training

    # deterministic by seed; another seed gives another video
    assert cli(run_dir, images, tmp_path / "b.mp4", "--seed", "1", "--fps", "6") == 0
    assert np.array_equal(read_mp4(tmp_path / "b.mp4")[0], frames)
    assert cli(run_dir, images, tmp_path / "c.mp4", "--seed", "2", "--fps", "6") == 0
    assert not np.array_equal(read_mp4(tmp_path / "c.mp4")[0], frames)


def test_cli_prompt_batch(run_dir, images, tmp_path):
    (tmp_path / "prompts.txt").write_text("a cat\n\na dog on a sofa\n")
    args = ["--ckpt", str(run_dir), "--ref", f"{images['rgba']}:subject", "--ref", f"{images['scene']}:scene",
            "--prompt", "a bird", "--prompts-file", str(tmp_path / "prompts.txt"), "--frames", "9",
            "--scheduler", "euler", "--batch-size", "2", "--out", str(tmp_path / "v.mp4")]
    assert main(args + FAST) == 0
    for i in range(3):
        assert read_mp4(tmp_path / f"v_{i}.mp4")[0].shape == (9, 32, 32, 3)
    assert not (tmp_path / "v.mp4").exists()
    assert Image.open(tmp_path / "v_grid.png").size[1] == 4 * 34 + 2  # refs + one row per prompt


def test_sampler_defaults_come_from_the_run_and_flags_override_them(run_dir, tmp_path):
    """`generate` samples with the run's `sample` section (mini: CFG 1) unless a flag says otherwise; an
    export carries the section, so it samples the same way."""
    source = dataclasses.replace(resolve_checkpoint(run_dir), sample=SampleConfig(steps=7, guidance=1.0))
    base = ["--ckpt", str(run_dir), "--prompt", "a cat"]
    _, sampler = request_from_args(parse_args(base), source)
    assert (sampler.steps, sampler.guidance, sampler.scheduler) == (7, 1.0, "unipc")
    _, sampler = request_from_args(parse_args(base + ["--guidance", "3", "--steps", "4", "--scheduler", "euler"]), source)
    assert (sampler.steps, sampler.guidance, sampler.scheduler) == (4, 3.0, "euler")
    assert sampler.guidance_interval == (0.0, 1.0)  # every step guided unless the run or a flag says otherwise
    source = dataclasses.replace(source, sample=SampleConfig(guidance=3.0, guidance_interval=[0.1, 0.9]))
    assert request_from_args(parse_args(base), source)[1].guidance_interval == (0.1, 0.9)
    _, sampler = request_from_args(parse_args(base + ["--guidance-interval", "0.2", "0.8"]), source)
    assert sampler.guidance_interval == (0.2, 0.8)
    # the tiny run's own section: the paper's 50 steps and CFG 5 (tiny sets none)
    run_source = resolve_checkpoint(run_dir)
    assert run_source.sample == SampleConfig(steps=50, guidance=5.0)
    assert resolve_checkpoint(export(run_dir, tmp_path / "exp")).sample == run_source.sample
    assert load_config("saber_full", "mini").sample.guidance == 1.0


def test_reference_size_comes_from_the_run_and_the_flag_overrides_it(run_dir, images, tmp_path, capsys):
    """References are prepared at the run's sample.reference_size (mini: 0.35) unless --reference-size says a
    fraction or 'fit' (the paper's whole-image fit); a bad value is refused before any model loads."""
    source = dataclasses.replace(resolve_checkpoint(run_dir), sample=SampleConfig(reference_size=0.35))
    base = ["--ckpt", str(run_dir), "--prompt", "a cat"]
    assert subject_size(parse_args(base), source) == 0.35
    assert subject_size(parse_args(base + ["--reference-size", "0.3"]), source) == 0.3
    assert subject_size(parse_args(base + ["--reference-size", "fit"]), source) is None
    assert subject_size(parse_args(base), resolve_checkpoint(run_dir)) is None  # tiny sets none: the paper's fit
    assert load_config("saber_full", "mini").sample.reference_size == 0.35
    for bad in ("0", "1.5", "big"):
        with pytest.raises(SystemExit) as exc:
            parse_args(base + ["--reference-size", bad])
        assert exc.value.code == 2 and "expected a fraction in (0, 1] or 'fit'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="reference_size must be in"):
        SampleConfig(reference_size=2.0)


def test_batch_matches_single_prompts(run_dir, images):
    """Prompt i of a batch is seeded with seed + i: the same video as generating it alone."""
    gen = Generator.from_checkpoint(run_dir)
    refs, masks = prepare_references([Reference(str(images["rgba"]))], ReferenceConfig(height=32, width=32))
    video, sampler = VideoSpec(32, 32, 5, 8.0), SamplerConfig(steps=2)
    both = gen.generate(["a cat", "a dog"], refs, masks, video, sampler, seed=3, progress=False)
    assert both.shape == (2, 3, 5, 32, 32) and both.abs().max() <= 1.0
    alone = gen.generate(["a dog"], refs, masks, video, sampler, seed=4, progress=False)
    torch.testing.assert_close(both[1:], alone, atol=1e-4, rtol=0)
    assert (both[0] - both[1]).abs().max() > 0.01


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_and_checkpoint_paths_match_the_run(run_dir, images, tmp_path):
    refs, masks = prepare_references([Reference(str(images["rgba"])), Reference(str(images["scene"]), "scene")],
                                     ReferenceConfig(height=32, width=32))
    video, sampler = VideoSpec(32, 32, 5, 8.0), SamplerConfig(steps=2, guidance=3.0)

    def sample(gen: Generator) -> torch.Tensor:
        return gen.generate(["a red ball"], refs, masks, video, sampler, seed=5, progress=False)

    ema, raw = sample(Generator.from_checkpoint(run_dir)), sample(Generator.from_checkpoint(run_dir, raw=True))
    assert not torch.equal(ema, raw)  # one step apart: EMA and trained weights differ
    ema_export = export(run_dir, tmp_path / "ema")
    raw_export = export(run_dir, tmp_path / "raw", prefer_ema=False)
    assert torch.equal(sample(Generator.from_checkpoint(ema_export)), ema)
    assert torch.equal(sample(Generator.from_checkpoint(raw_export)), raw)
    assert torch.equal(sample(Generator.from_checkpoint(run_dir / "checkpoints" / "last.ckpt")), ema)
    # a sharded folder as Lightning's ModelParallelStrategy writes it ({"state_dict": ...} + .metadata)
    sharded = tmp_path / "sharded_run"
    (sharded / "checkpoints").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", sharded / "config.yaml")
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    dcp.save({"state_dict": state}, checkpoint_id=str(sharded / "checkpoints" / "last.ckpt"), no_dist=True)
    assert torch.equal(sample(Generator.from_checkpoint(sharded)), ema)
    # bf16 (the CUDA default): float32 kept where diffusers keeps it, so run and export still agree exactly
    bf16 = [sample(Generator.from_checkpoint(src, dtype=torch.bfloat16)) for src in (run_dir, ema_export)]
    assert torch.equal(bf16[0], bf16[1]) and not torch.equal(bf16[0], ema)
    assert resolve_checkpoint(ema_export).video_defaults() == VideoSpec(32, 32, 5, 8.0)  # from the scale's config

    # the CLI on the exported folder writes the same video as on the run
    for name, ckpt in (("run", run_dir), ("export", ema_export)):
        assert main(["--ckpt", str(ckpt), "--ref", str(images["rgba"]), "--prompt", "a ball", "--out",
                     str(tmp_path / f"{name}.mp4")] + FAST) == 0
    assert np.array_equal(read_mp4(tmp_path / "run.mp4")[0], read_mp4(tmp_path / "export.mp4")[0])
    # an EMA export has no raw weights
    assert main(["--ckpt", str(ema_export), "--raw", "--ref", str(images["rgba"]), "--prompt", "x",
                 "--out", str(tmp_path / "x.mp4")]) == 2


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to build or load a model fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the inputs were checked")

    monkeypatch.setattr(wan, "build_components", forbidden)
    monkeypatch.setattr(wan, "meta_transformer", forbidden)
    monkeypatch.setattr(generate.Generator, "from_source", forbidden)
    monkeypatch.delenv("WAN_DIR", raising=False)


BAD_INPUTS = {
    "missing image": (["--ref", "{d}/nope.png"], "reference image not found: .*nope.png"),
    "unreadable image": (["--ref", "{broken}"], "cannot read reference image .*broken.png"),
    "empty segmentation": (["--ref", "{empty}"], "empty segmentation for .*empty.png"),
    "no segmentation": (["--ref", "{photo}"], "no segmentation for subject reference .*photo.png"),
    "too many references": (["--ref", "{rgba}"] * 9, "9 references given.*model.max_refs=8"),
    "size": (["--ref", "{rgba}", "--height", "24"], "multiples of 16 .*24x32"),
    "frames": (["--ref", "{rgba}", "--frames", "6"], "frames must be of the form 4k\\+1.*got 6"),
    "missing checkpoint": (["--ref", "{rgba}", "--ckpt", "{d}/no_run"], "checkpoint not found: .*no_run"),
    "missing mask": (["--ref", "{photo}", "--mask", "{d}/m.png"], "mask file not found: .*m.png"),
    "mask on a scene": (["--ref", "{scene}:scene", "--mask", "{photo_mask}"], "scene reference"),
    "bad out": (["--ref", "{rgba}", "--out", "{d}/x.gif"], "--out must end in .mp4"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_fail_before_any_model(case, run_dir, images, tmp_path, capsys, no_model):
    extra, message = BAD_INPUTS[case]
    names = {k: str(v) for k, v in images.items()} | {"d": str(tmp_path)}
    args = [a.format(**names) for a in extra]
    base = ["--ckpt", str(run_dir), "--prompt", "a cat", "--out", str(tmp_path / "o.mp4")]
    assert main(base + args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "o.mp4").exists()


def test_bad_sources_fail_before_any_model(run_dir, images, tmp_path, capsys, no_model):
    ref = ["--ref", str(images["rgba"]), "--prompt", "a cat", "--out", str(tmp_path / "o.mp4")]
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    shutil.copy(run_dir / "config.yaml", empty_run / "config.yaml")
    assert main(["--ckpt", str(empty_run)] + ref) == 2
    assert "no last.ckpt in" in capsys.readouterr().err

    real = tmp_path / "real_run"  # a 1.3B run needs wan_dir for the VAE and umT5
    (real / "checkpoints").mkdir(parents=True)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["model"]["scale"] = "1.3B"
    (real / "config.yaml").write_text(yaml.safe_dump(cfg))
    (real / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert main(["--ckpt", str(real)] + ref) == 2
    assert "needs wan_dir" in capsys.readouterr().err
    assert main(["--ckpt", str(real), "--wan-dir", str(tmp_path)] + ref) == 2
    assert "lacks subfolder" in capsys.readouterr().err
    assert main(["--ckpt", str(run_dir), "--ref", str(images["rgba"]), "--out", str(tmp_path / "o.mp4")]) == 2
    assert "no prompt" in capsys.readouterr().err


def test_limits_from_the_scale_spec():
    """Divisibility comes from the VAE and patch sizes without building anything."""
    tiny, mini = model_limits(wan.ModelConfig(scale="tiny")), model_limits(wan.ModelConfig(scale="mini"))
    real = model_limits(wan.ModelConfig(scale="14B"))
    assert (tiny.spatial, tiny.temporal, tiny.patch) == (8, 4, 2)
    assert (mini.spatial, mini.temporal, mini.patch) == (2, 4, 2)
    assert (real.spatial, real.temporal, real.patch) == (8, 4, 2)
    comps = wan.build_components(wan.ModelConfig(scale="tiny"))
    assert (comps.vae.spatial_factor, comps.vae.temporal_factor) == (tiny.spatial, tiny.temporal)
    real.check(VideoSpec(480, 832, 81, 16.0), 3)  # the paper's setting passes
    with pytest.raises(ValueError, match="max_refs=8"):
        real.check(VideoSpec(480, 832, 81, 16.0), 9)


# --- sampler ------------------------------------------------------------------------------------------


class OracleDiT(torch.nn.Module):
    """Predicts the exact flow velocity (x_t - z0) / t towards z0 = text_emb[:, 0, 0] (a constant latent)
    and records the reference counts it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: list[torch.Tensor] = []

    def forward(self, x, t, text, refs, cov, counts):
        self.counts.append(counts)
        sigma = (t / 1000.0).view(-1, 1, 1, 1, 1)
        return (x - text[:, 0, 0].view(-1, 1, 1, 1, 1)) / sigma


@pytest.mark.parametrize("scheduler", ["unipc", "euler"])
def test_sampler_lands_on_the_oracle_target_with_cfg(scheduler):
    """With the exact velocity both schedulers end at z0; CFG then ends at z_u + g (z_c - z_u)."""
    shape = (2, 4, 2, 4, 4)
    text = torch.tensor([1.0, -0.5]).view(2, 1, 1).expand(2, 3, 8)  # z0 of the conditional branch
    neg = torch.full((2, 3, 8), 0.2)  # z0 of the unconditional branch
    refs, cov, counts = torch.zeros(2, 1, 4, 4, 4), torch.ones(2, 1, 1, 4, 4), torch.ones(2, dtype=torch.long)
    for guidance in (1.0, 3.0):
        cfg = SamplerConfig(steps=6, guidance=guidance, shift=3.0, scheduler=scheduler, drop_refs_uncond=True,
                            split_passes=False)  # one packed batch per step (the split is tested below)
        dit = OracleDiT()
        out = sample_latents(dit, shape, text, neg, refs, cov, counts, cfg, torch.Generator().manual_seed(0),
                             progress=False)
        z = 0.2 + guidance * (text[:, 0, 0] - 0.2) if guidance != 1.0 else text[:, 0, 0]
        # UniPC hands the model integer timesteps (999 for sigma 1, as Wan's pipeline does): the oracle's
        # sigma = t / 1000 is then off by up to 0.5/1000, hence the looser tolerance
        atol = 5e-3 if scheduler == "unipc" else 1e-4
        torch.testing.assert_close(out, z.view(2, 1, 1, 1, 1).expand(shape), atol=atol, rtol=0)
        assert len(dit.counts) == 6
        if guidance != 1.0:  # one 2B batch: references kept in the conditional half, dropped in the other
            assert dit.counts[0].tolist() == [1, 1, 0, 0]
    noise = torch.randn(shape)
    with pytest.raises(ValueError, match="noise must have shape"):
        sample_latents(OracleDiT(), shape, text, neg, None, None, None, SamplerConfig(steps=1), noise=noise[:1])
    with pytest.raises(ValueError, match="scheduler"):
        SamplerConfig(scheduler="ddim")


def test_guidance_interval_guides_only_the_steps_at_those_noise_levels():
    """sample.guidance_interval: the unconditional pass runs only where t is in [lo, hi]; the rest is the
    conditional velocity alone, so an interval that holds no step gives exactly the unguided video."""

    class Recorder(OracleDiT):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[int, float]] = []  # (batch, t / 1000) per DiT pass

        def forward(self, x, t, text, refs, cov, counts):
            self.calls.append((x.shape[0], float(t[0]) / 1000.0))
            return super().forward(x, t, text, refs, cov, counts)

    shape = (1, 4, 2, 4, 4)
    text, neg, noise = torch.ones(1, 3, 8), torch.full((1, 3, 8), 0.2), torch.randn(shape)

    def run(**kw):
        dit = Recorder()
        cfg = SamplerConfig(steps=8, shift=1.0, scheduler="euler", split_passes=False, **kw)
        return sample_latents(dit, shape, text, neg, None, None, None, cfg, progress=False, noise=noise), dit.calls

    unguided, calls = run(guidance=1.0)
    assert all(b == 1 for b, _ in calls)
    full, calls = run(guidance=4.0)
    assert all(b == 2 for b, _ in calls)
    torch.testing.assert_close(full, run(guidance=4.0, guidance_interval=(0.0, 1.0))[0], atol=0, rtol=0)
    mid, calls = run(guidance=4.0, guidance_interval=(0.3, 0.7))
    assert {round(t, 3) for b, t in calls if b == 2} == {round(t, 3) for _, t in calls if 0.3 <= t <= 0.7}
    assert 0 < sum(b == 2 for b, _ in calls) < len(calls)
    # the oracle's last Euler step lands on its target: the guided one (0.2 + 4 (1 - 0.2)) only if that step is guided
    torch.testing.assert_close(mid, torch.ones(shape), atol=1e-4, rtol=0)
    low, _ = run(guidance=4.0, guidance_interval=(0.0, 0.5))
    torch.testing.assert_close(low, torch.full(shape, 0.2 + 4.0 * 0.8), atol=1e-4, rtol=0)
    torch.testing.assert_close(full, low, atol=1e-4, rtol=0)
    none, _ = run(guidance=4.0, guidance_interval=(0.01, 0.02))  # 8 Euler steps: no t there
    torch.testing.assert_close(none, unguided, atol=0, rtol=0)
    with pytest.raises(ValueError, match="guidance_interval must satisfy"):
        SamplerConfig(guidance_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="guidance_interval must be"):
        SamplerConfig(guidance_interval=(0.5,))


def test_reference_guidance_composes_with_text_guidance():
    """sample.reference_guidance: a third branch (the prompt without references) adds (s_R - 1) (v(T, R) - v(T, none))
    to the text-guided velocity; with the exact velocity the sampler ends at that composed target."""

    class RefOracle(OracleDiT):
        """Towards z0 = text + 0.5 where a sample sees its references, text alone where it does not."""

        def forward(self, x, t, text, refs, cov, counts):
            self.counts.append(counts)
            sigma = (t / 1000.0).view(-1, 1, 1, 1, 1)
            seen = 0.5 * (counts > 0).float() if counts is not None else torch.zeros(x.shape[0])
            return (x - (text[:, 0, 0] + seen).view(-1, 1, 1, 1, 1)) / sigma

    shape = (1, 4, 2, 4, 4)
    text, neg, noise = torch.ones(1, 3, 8), torch.full((1, 3, 8), 0.2), torch.randn(shape)
    refs, cov, counts = torch.zeros(1, 1, 4, 4, 4), torch.ones(1, 1, 1, 4, 4), torch.ones(1, dtype=torch.long)

    def run(with_refs: bool = True, **kw):
        dit = RefOracle()
        cfg = SamplerConfig(steps=6, shift=1.0, scheduler="euler", split_passes=False, **kw)
        r = (refs, cov, counts) if with_refs else (None, None, None)
        return sample_latents(dit, shape, text, neg, *r, cfg, progress=False, noise=noise), dit.counts

    for s_t, s_r in ((1.0, 1.0), (1.0, 3.0), (4.0, 1.0), (4.0, 3.0)):
        out, seen = run(guidance=s_t, reference_guidance=s_r)
        target = (1.0 + 0.5) + (s_t - 1.0) * (1.0 - 0.2) + (s_r - 1.0) * 0.5
        torch.testing.assert_close(out, torch.full(shape, target), atol=1e-4, rtol=0)
        # branches stacked: conditional, then the text's unconditional (refs kept), then the prompt without refs
        assert seen[0].tolist() == [1] + [1] * (s_t != 1.0) + [0] * (s_r != 1.0)
    # only the guided noise levels run the third branch; without references it never runs
    _, seen = run(guidance=1.0, reference_guidance=3.0, guidance_interval=(0.01, 0.02))
    assert all(c.tolist() == [1] for c in seen)
    out, seen = run(with_refs=False, guidance=1.0, reference_guidance=3.0)
    assert all(c is None for c in seen)
    torch.testing.assert_close(out, torch.ones(shape), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="reference_guidance must be >= 0"):
        SamplerConfig(reference_guidance=-1.0)


# --- eval glue ---------------------------------------------------------------------------------------


def _opens2v(root: Path, images: dict[str, Path], subject: str = "rgba") -> Path:
    """A 2-case OpenS2V folder in the benchmark's case format."""
    cases = {
        "singleobj_1": {"img_paths": ["Images/singleobject/ball/1.png"], "prompt": "A ball on a table.",
                        "class_label": ["Ball"], "synthesis_flag": "True"},
        "humanobj_2": {"img_paths": ["Images/humanobj/ball/2.png", "Images/humanobj/scene/park/1.jpg"],
                       "prompt": "A ball in a park.", "class_label": ["Ball", "Park"], "synthesis_flag": "True"},
    }
    sources = {"Images/singleobject/ball/1.png": images[subject], "Images/humanobj/ball/2.png": images[subject],
               "Images/humanobj/scene/park/1.jpg": images["scene"]}
    for rel, src in sources.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, root / rel)
    (root / "Open-Domain_Eval.json").write_text(json.dumps(cases, indent=4))
    return root


def test_eval_generate_writes_case_videos_and_resumes(run_dir, images, tmp_path, monkeypatch):
    root, out = _opens2v(tmp_path / "OpenS2V-Eval", images), tmp_path / "videos"
    args = ["generate", "--ckpt", str(run_dir), "--cases", str(root), "--domain", "Open-Domain", "--out", str(out)]
    assert eval_main(args + FAST) == 0
    assert sorted(p.name for p in out.iterdir()) == ["humanobj_2.mp4", "singleobj_1.mp4"]  # nothing else
    for name in ("humanobj_2", "singleobj_1"):
        frames, fps, _, _ = read_mp4(out / f"{name}.mp4")
        assert frames.shape == (5, 32, 32, 3) and fps == 8.0

    def forbidden(*args, **kwargs):
        raise AssertionError("nothing left to generate: the model must not load")

    monkeypatch.setattr(generate.Generator, "from_source", forbidden)
    assert eval_main(args + FAST) == 0  # resumed: both videos decode, both skipped


def test_eval_generate_checks_cases_first(run_dir, images, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate.Generator, "from_source", lambda *a, **k: pytest.fail("model loaded"))
    root = _opens2v(tmp_path / "OpenS2V-Eval", images, subject="photo")  # subjects without alpha
    args = ["generate", "--ckpt", str(run_dir), "--cases", str(root), "--out", str(tmp_path / "v")]
    assert eval_main(args) == 2
    err = capsys.readouterr().err
    assert "singleobj_1: subject" in err and "--birefnet-dir" in err
    assert eval_main(args + ["--birefnet-dir", str(tmp_path / "no_birefnet")]) == 2
    assert "BiRefNet folder not found" in capsys.readouterr().err


def test_eval_aggregate_delegates(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    fields = {"aesthetic_score.json": "aes_score", "motion_smoothness.json": "motion_smoothness",
              "motion_amplitude.json": "motion_fb", "facesim.json": "cur_score", "gmescore.json": "gme_score",
              "nexusscore.json": "nexus_score"}
    values = {"aes_score": 5.5, "motion_smoothness": 0.9, "motion_fb": 0.3, "cur_score": 0.5, "gme_score": 0.7,
              "nexus_score": 0.025}
    for name, key in fields.items():
        (raw / name).write_text(json.dumps({"v": {key: values[key]}}))
    for i in (1, 2, 3):
        (raw / f"naturalscore_{i}.json").write_text(json.dumps({"v": "4"}))
    assert eval_main(["aggregate", "--raw", str(raw), "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    expected = 0.16 * 0.5 + 0.06 * 0.9 + 0.02 * 0.3 + 0.20 * 0.5 + 0.12 * 0.7 + 0.20 * 0.5 + 0.24 * 0.75
    assert result["total_score"] == pytest.approx(expected)
    assert "saber_pl (ours)" in capsys.readouterr().out


def test_split_guidance_passes_equal_one_packed_batch() -> None:
    """CFG as one b=1 DiT pass per sample and branch gives the packed 2B batch's latents (less memory at 14B)."""
    import dataclasses

    from saber_pl.config import load_config
    from saber_pl.sampling import SamplerConfig, sample_latents
    from saber_pl.wan import build_components

    torch.manual_seed(0)
    dit = build_components(load_config("saber_full", "tiny").model).transformer.eval()
    with torch.no_grad():  # non-zero reference channels, so the references matter
        dit.wan.patch_embedding.weight.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    shape = (3, 16, 2, 8, 8)
    text, neg = torch.randn(3, 5, 32, generator=g), torch.zeros(3, 5, 32)
    refs, cov = torch.randn(3, 2, 16, 8, 8, generator=g), torch.rand(3, 2, 1, 8, 8, generator=g)
    counts = torch.tensor([2, 0, 1])
    noise = torch.randn(shape, generator=g)
    packed = SamplerConfig(steps=3, guidance=5.0, shift=3.0, split_passes=False)
    out = {}
    for split in (False, True):
        cfg = dataclasses.replace(packed, split_passes=split)
        out[split] = sample_latents(dit, shape, text, neg, refs, cov, counts, cfg, progress=False, noise=noise)
    torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)
    no_refs = sample_latents(dit, shape, text, neg, None, None, None, packed, progress=False, noise=noise)
    assert (no_refs - out[True]).abs().max() > 1e-3  # the references did take part


def test_text_encoder_leaves_the_device_before_the_dit_runs(run_dir, images):
    """With offloading (the default on CUDA) umT5 is moved off the device after the prompts are encoded and
    before the first DiT pass, and back for the next call; the video is the same as without offloading."""
    gen = Generator.from_checkpoint(run_dir)
    refs, masks = prepare_references([Reference(str(images["rgba"]))], ReferenceConfig(height=32, width=32))
    video, sampler = VideoSpec(32, 32, 5, 8.0), SamplerConfig(steps=2)
    plain = gen.generate(["a dog"], refs, masks, video, sampler, progress=False)
    events: list[str] = []
    real_to = gen.text_encoder.to
    gen.text_encoder.to = lambda *a, **k: (events.append(f"text.to({a[0] if a else k})"), real_to(*a, **k))[1]
    gen.dit.register_forward_pre_hook(lambda *a: events.append("dit") if "dit" not in events else None)
    gen.offload_text_encoder = True
    for _ in range(2):
        out = gen.generate(["a dog"], refs, masks, video, sampler, progress=False)
    assert torch.equal(out, plain)
    assert events.index("text.to(cpu)") < events.index("dit")
    assert events.count("text.to(cpu)") == 2
