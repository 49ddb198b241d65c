"""Precomputed text embeddings and cached video latents (sidecar shards): same loss as online, skips, resume."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
import webdataset as wds

from saber_pl import wan
from saber_pl.config import ConfigError, load_config
from saber_pl.module import SaberModule
from saber_pl.shards import write_samples
from saber_pl.sidecars import read_tensor
from saber_pl.train import build_datamodule
from saber_pl.video import decode_clip

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "data" / "test" / "tiny-000000.tar"
TEXT_LEN = ["model.text_len=96"]  # longer than the tiny captions: embeddings of different lengths, zero padding


def _tool(name: str):
    """A data/ script as a module (data/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


precompute_text, cache_latents = _tool("precompute_text"), _tool("cache_latents")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sidecars(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny shard's text sidecars (fp32 and bf16) and latent sidecars (fp32), made by the tools."""
    d = tmp_path_factory.mktemp("sidecars")
    before = digest(TINY)
    common = ["--scale", "tiny", "--shards", str(TINY), "--no-progress", "--device", "cpu"]
    assert precompute_text.main([*common, "--out", str(d / "text32"), "--dtype", "float32", *TEXT_LEN]) == 0
    assert precompute_text.main([*common, "--out", str(d / "text16"), *TEXT_LEN]) == 0  # bf16, the default
    assert cache_latents.main([*common, "--out", str(d / "lat32"), "--dtype", "float32"]) == 0
    assert digest(TINY) == before  # the source shard is never rewritten
    return {"text32": d / "text32", "text16": d / "text16", "lat32": d / "lat32"}


def cfg_of(tmp_path: Path, *overrides: str):
    return load_config("saber_full", "tiny", [f"logging.runs_dir={tmp_path}", *TEXT_LEN, *overrides])


def first_batch(module: SaberModule, cfg, train: bool = True) -> dict:
    dm = build_datamodule(cfg, module.frozen.tokenize, seed_offset=0)
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    return dm.on_after_batch_transfer(next(iter(loader)), 0), dm


def loss(module: SaberModule, batch: dict) -> torch.Tensor:
    return module.flow_loss(batch, generator=torch.Generator().manual_seed(0))["loss"]


def test_precomputed_text_gives_the_online_loss_without_umt5(sidecars, tmp_path: Path, monkeypatch) -> None:
    online = SaberModule(cfg_of(tmp_path))
    b_on, _ = first_batch(online, online.cfg)
    emb_on = online.encode_text(b_on)  # [B, 96, D], zero past each prompt
    lengths = b_on["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1 and int(lengths.max()) < 96  # the padding is exercised
    # the precomputed run never builds umT5: building one now fails
    monkeypatch.setattr(wan, "UMT5EncoderModel", lambda *a, **k: pytest.fail("umT5 built with text=precomputed"))
    for name, tol in (("text32", 1e-5), ("text16", 2**-8)):  # fp32: equal; bf16: within bf16 rounding
        cfg = cfg_of(tmp_path, "data.text=precomputed", f"data.text_sidecars={sidecars[name]}")
        pre = SaberModule(cfg)
        assert pre.frozen.text_encoder is None and pre.frozen.tokenize is None
        b_pre, _ = first_batch(pre, cfg)
        assert b_pre["key"] == b_on["key"] and "input_ids" not in b_pre
        assert b_pre["text"].shape == emb_on.shape  # padded to text_len in collate
        torch.testing.assert_close(b_pre["text"].float(), emb_on, rtol=tol, atol=tol * emb_on.abs().max().item())
        pad = torch.arange(96)[None, :] >= lengths[:, None]
        assert not b_pre["text"][pad].any()  # zero past each prompt, as TextEncoder.encode
        torch.testing.assert_close(loss(pre, b_pre), loss(online, b_on), rtol=1e-5 if name == "text32" else 1e-2,
                                   atol=0.0)


def test_caption_dropout_yields_the_stored_empty_embedding(sidecars, tmp_path: Path) -> None:
    online = SaberModule(cfg_of(tmp_path))
    ids, mask = online.frozen.tokenize([""])
    empty = online.frozen.text_encoder.encode(ids, mask)[0]  # [96, D]
    cfg = cfg_of(tmp_path, "data.text=precomputed", f"data.text_sidecars={sidecars['text32']}",
                 "data.caption_dropout=1.0")
    pre = SaberModule(cfg)
    batch, _ = first_batch(pre, cfg)
    assert batch["caption"] == ["", ""]
    for row in batch["text"]:
        torch.testing.assert_close(row, empty, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pre.encode_empty_text(2), empty.expand(2, -1, -1), rtol=1e-5, atol=1e-6)  # CFG negative


def test_a_sample_without_its_embedding_is_skipped_and_counted(sidecars, tmp_path: Path) -> None:
    src = sidecars["text32"]
    holed = tmp_path / "holed"
    holed.mkdir()
    (holed / "empty.safetensors").write_bytes((src / "empty.safetensors").read_bytes())
    samples = list(wds.WebDataset(str(src / TINY.name), shardshuffle=False))
    dropped = samples[2]["__key__"]
    with tarfile.open(holed / TINY.name, "w") as tar:  # the sidecar less one sample
        for s in samples:
            if s["__key__"] == dropped:
                continue
            data = s["text.safetensors"]
            info = tarfile.TarInfo(f"{s['__key__']}.text.safetensors")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = cfg_of(tmp_path, "data.text=precomputed", f"data.text_sidecars={holed}", "data.val_batch_size=1")
    pre = SaberModule(cfg)
    dm = build_datamodule(cfg, pre.frozen.tokenize, seed_offset=0)
    keys = [k for b in dm.val_dataloader() for k in dm.on_after_batch_transfer(b, 0)["key"]]
    assert dropped not in keys and len(keys) == len(samples) - 1
    assert dm.skip_counts()["missing_text"] == 1


def test_text_tool_resumes_after_a_kill_without_redoing_finished_shards(tmp_path: Path, monkeypatch) -> None:
    samples = list(wds.WebDataset(str(TINY), shardshuffle=False))
    shards = write_samples(iter(samples), str(tmp_path / "src-%06d.tar"), maxcount=2)  # 3 shards of 2
    assert len(shards) == 3
    args = ["--scale", "tiny", "--shards", str(tmp_path / "src-{000000..000002}.tar"), "--batch-size", "2",
            "--no-progress", "--device", "cpu", *TEXT_LEN]
    real_encode, calls = wan.TextEncoder.encode, []

    def dies_on_third(self, ids, mask):  # call 1: the empty caption, 2: shard 0, 3: shard 1 -> killed mid-shard
        calls.append(len(ids))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(self, ids, mask)

    out = tmp_path / "text"
    monkeypatch.setattr(wan.TextEncoder, "encode", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        precompute_text.main([*args, "--out", str(out)])
    assert (out / "src-000000.tar").is_file() and not (out / "src-000001.tar").exists()
    assert list(out.glob(".src-000001.tar.tmp-*"))  # the partial write is a temporary file, never the sidecar
    first = (out / "src-000000.tar").stat()
    calls.clear()
    monkeypatch.setattr(wan.TextEncoder, "encode", lambda self, i, m: (calls.append(len(i)), real_encode(self, i, m))[1])
    precompute_text.main([*args, "--out", str(out)])
    assert calls == [2, 2]  # shards 1 and 2 only: neither shard 0 nor the empty caption again
    assert (out / "src-000000.tar").stat().st_mtime_ns == first.st_mtime_ns
    assert not list(out.glob(".*tmp-*"))
    # the resumed folder equals an uninterrupted run's, and two ranks deal the shards out between them
    clean = tmp_path / "clean"
    for rank in (0, 1):
        precompute_text.main([*args, "--out", str(clean), "--rank", str(rank), "--world", "2"])
    assert sorted(p.name for p in clean.iterdir()) == sorted(p.name for p in out.iterdir())
    for name in ("src-000000.tar", "src-000001.tar", "src-000002.tar", "empty.safetensors"):
        assert digest(out / name) == digest(clean / name), name


def test_cached_latents_give_the_online_loss_for_the_same_window(sidecars, tmp_path: Path) -> None:
    online = SaberModule(cfg_of(tmp_path))
    cfg = cfg_of(tmp_path, "data.latents=cached", f"data.latent_sidecars={sidecars['lat32']}")
    cached = SaberModule(cfg)
    b_c, _ = first_batch(cached, cfg)
    assert "video" not in b_c and b_c["latents"].shape[1:] == (16, 2, 4, 4)
    raw = {s["__key__"]: s for s in wds.WebDataset(str(TINY), shardshuffle=False)}
    d = cfg.data
    clips = torch.stack([decode_clip(raw[k]["mp4"], d.num_frames, d.fps, d.height, d.width, start=0)
                         for k in b_c["key"]])  # the first window, as the online path decodes it
    video = clips.permute(0, 2, 1, 3, 4).float().div(127.5).sub(1.0)  # [B, 3, F, H, W]
    b_on = {**{k: v for k, v in b_c.items() if k != "latents"}, "video": video}  # same refs, masks, text
    torch.testing.assert_close(b_c["latents"], online.encode_video(video), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss(cached, b_c), loss(online, b_on), rtol=1e-5, atol=0.0)
    # the original shard still trains online, unchanged
    b_plain, _ = first_batch(online, online.cfg)
    assert b_plain["video"].shape == (2, 3, d.num_frames, d.height, d.width) and torch.isfinite(loss(online, b_plain))


def test_cached_references_are_frames_of_the_clip(sidecars, tmp_path: Path) -> None:
    cfg = cfg_of(tmp_path, "data.latents=cached", f"data.latent_sidecars={sidecars['lat32']}", "data.refs_min=3",
                 "data.batch_size=6", "data.val_batch_size=6")
    module = SaberModule(cfg)
    dm = build_datamodule(cfg, module.frozen.tokenize, seed_offset=0)
    batch = next(iter(dm.val_dataloader()))  # before transfer: uint8 reference frames
    raw = {s["__key__"]: s for s in wds.WebDataset(str(TINY), shardshuffle=False)}
    d = cfg.data
    picked = set()
    for i, key in enumerate(batch["key"]):
        clip = decode_clip(raw[key]["mp4"], d.num_frames, d.fps, d.height, d.width, start=0)  # [F, 3, H, W]
        assert int(batch["ref_counts"][i]) == 3
        for j in range(3):
            hits = [f for f in range(clip.shape[0]) if torch.equal(batch["ref_frames"][i, j], clip[f])]
            assert hits, (key, j)  # lossless: exactly one of the window's frames
            picked.update(hits)
    assert len(picked) > 1  # drawn among the stored frames, not always the same one
    _, meta = read_tensor(next(iter(wds.WebDataset(str(sidecars["lat32"] / TINY.name), shardshuffle=False)))["latent.safetensors"],
                          "latent")
    assert meta["start"] == 0 and meta["frames"] == [0, 1, 2, 3, 4]


def test_a_step_and_a_validation_video_with_only_the_dit_and_vae(sidecars, tmp_path: Path) -> None:
    cfg = cfg_of(tmp_path, "data.text=precomputed", f"data.text_sidecars={sidecars['text16']}",
                 "data.latents=cached", f"data.latent_sidecars={sidecars['lat32']}", "data.caption_dropout=0.5")
    module = SaberModule(cfg)
    dm = build_datamodule(cfg, module.frozen.tokenize, seed_offset=0)
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    batch, _ = first_batch(module, cfg, train=False)
    videos = module.generate_validation_videos(batch, 1)
    assert videos.shape == (1, 3, cfg.data.num_frames, cfg.data.height, cfg.data.width)


def test_knobs_need_their_sidecars_and_real_scales_skip_umt5(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="data.text_sidecars"):
        load_config("saber_full", "tiny", ["data.text=precomputed"])
    with pytest.raises(ConfigError, match="data.latent_sidecars"):
        load_config("saber_full", "tiny", ["data.latents=cached"])
    with pytest.raises(ConfigError, match="data.text"):
        load_config("saber_full", "tiny", ["data.text=cached"])
    from diffusers import AutoencoderKLWan

    from saber_pl import loading

    folder = tmp_path / "wan"  # a Wan folder with only the VAE: umT5 and its tokenizer are not needed
    AutoencoderKLWan(**wan.SCALES["tiny"]().vae).save_pretrained(folder / "vae")
    monkeypatch.setattr(wan.UMT5EncoderModel, "from_pretrained", lambda *a, **k: pytest.fail("umT5 loaded"))
    frozen = loading.LazyFrozenParts(wan.ModelConfig(scale="14B", wan_dir=str(folder)), text_encoder=False)
    frozen.to(torch.device("cpu"), torch.float32)
    assert frozen.text_encoder is None and frozen.tokenize is None and isinstance(frozen.vae, wan.VideoVAE)


@pytest.mark.parametrize("tool", ["precompute_text", "cache_latents"])
def test_tools_stop_on_missing_shards_and_bad_keys(tool: str, tmp_path: Path) -> None:
    """A typo in --shards would write empty sidecars (every sample then skipped in training): it stops instead."""
    main = {"precompute_text": precompute_text, "cache_latents": cache_latents}[tool].main
    with pytest.raises(SystemExit, match=r"2 of 2 shard\(s\) not found: .*nope-000.tar"):
        main(["--scale", "tiny", "--shards", str(tmp_path / "nope-{000..001}.tar"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="config error: unknown config key 'bogus'"):
        main(["--scale", "tiny", "--out", str(tmp_path / "o"), "bogus.key=1"])
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
