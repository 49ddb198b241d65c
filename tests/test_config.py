"""Every shipped experiment x scale resolves; bad keys and types fail naming the key; CLI errors are clear."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from saber_pl.config import ConfigError, list_experiments, list_scales, load_config, to_dict
from saber_pl.train import main

EXPERIMENTS = list_experiments()
SCALES = list_scales()


def test_shipped_files() -> None:
    assert set(SCALES) == {"tiny", "mini", "1.3B", "14B"}
    assert set(EXPERIMENTS) >= {"saber_full", "ellipse_only", "fourier_only", "polygon_only", "fixed_ratio",
                                "no_mask_aug", "no_attn_mask", "r2v_triplets", "t2v_baseline"}


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_and_scale_resolves(exp: str, scale: str) -> None:
    cfg = load_config(exp, scale)
    assert cfg.exp == exp and cfg.scale == scale
    assert cfg.model.scale == scale
    assert cfg.run_name == f"{exp}-{scale}"


def _diff(a: object, b: object, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ between two resolved configs."""
    da, db = to_dict(a), to_dict(b)
    out: set[str] = set()

    def walk(x: dict, y: dict, p: str) -> None:
        for k in x:
            key = f"{p}.{k}" if p else k
            if isinstance(x[k], dict):
                walk(x[k], y[k], key)
            elif x[k] != y[k]:
                out.add(key)

    walk(da, db, prefix)
    return out


@pytest.mark.parametrize("exp,expected", [
    ("ellipse_only", {"masks.families"}),
    ("fourier_only", {"masks.families"}),
    ("polygon_only", {"masks.families"}),
    ("fixed_ratio", {"masks.fixed_ratio"}),
    ("no_mask_aug", {"augment.enabled"}),
    ("no_attn_mask", {"model.ref_attn_mask"}),
    ("t2v_baseline", {"data.refs_min", "data.refs_max"}),
])
def test_ablations_are_small_deltas(exp: str, expected: set[str]) -> None:
    base = load_config("saber_full", "tiny")
    cfg = load_config(exp, "tiny")
    assert _diff(cfg, base) - {"exp", "description"} == expected


def test_paper_recipe_at_14B() -> None:
    cfg = load_config("saber_full", "14B")
    assert cfg.optim.lr == 1e-5
    assert (cfg.data.height, cfg.data.width, cfg.data.num_frames, cfg.data.fps) == (480, 832, 81, 16.0)
    assert cfg.trainer.strategy == "fsdp2" and cfg.model.gradient_checkpointing
    t = cfg.trainer
    assert t.devices * t.num_nodes * cfg.data.batch_size * t.accumulate_grad_batches == 64
    assert cfg.masks.fixed_ratio is None and cfg.augment.enabled and cfg.model.ref_attn_mask
    assert load_config("fixed_ratio", "14B").masks.fixed_ratio == 0.3
    s = cfg.sample  # SABER.md: 50 steps, CFG 5.0 (Wan's)
    assert (s.steps, s.guidance, s.scheduler) == (50, 5.0, "unipc")


def test_overrides_and_errors() -> None:
    cfg = load_config("saber_full", "tiny", ["optim.lr=0.5", "data.batch_size=3"])
    assert cfg.optim.lr == 0.5 and cfg.data.batch_size == 3
    with pytest.raises(ConfigError, match="masks.bogus"):
        load_config("saber_full", "tiny", ["masks.bogus=1"])
    with pytest.raises(ConfigError, match="optim.lr"):
        load_config("saber_full", "tiny", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config("saber_full", "tiny", ["data.batch_size=2.5"])
    with pytest.raises(ConfigError, match="trainer.strategy"):
        load_config("saber_full", "tiny", ["trainer.strategy=fsdp1"])
    with pytest.raises(ConfigError, match="sample.*guidance must be >= 0"):
        load_config("saber_full", "tiny", ["sample.guidance=-1"])
    with pytest.raises(ConfigError, match="sample.scheduler"):
        load_config("saber_full", "tiny", ["sample.scheduler=ddim"])
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        load_config("nope", "tiny")
    with pytest.raises(ConfigError, match="unknown scale 'huge'"):
        load_config("saber_full", "huge")


def test_unknown_key_in_a_file(tmp_path) -> None:
    (tmp_path / "scales").mkdir()
    (tmp_path / "scales" / "s.yaml").write_text("model: {scale: tiny}\n")
    (tmp_path / "base.yaml").write_text("optim: {lr: 1.0e-4}\n")
    (tmp_path / "bad.yaml").write_text("parent: base\noptim: {learning_rate: 1.0}\n")
    assert load_config("base", "s", root=tmp_path).optim.lr == 1e-4
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config("bad", "s", root=tmp_path)


def test_dry_run_prints_config_and_exits(capsys) -> None:
    assert main(["--exp", "ellipse_only", "--scale", "tiny", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["exp"] == "ellipse_only" and printed["masks"]["families"] == ["ellipse"]


def test_missing_weights_and_shards_name_the_variable(capsys, tmp_path) -> None:
    assert main(["--exp", "saber_full", "--scale", "14B", f"logging.runs_dir={tmp_path}"]) == 2
    assert "WAN_DIR" in capsys.readouterr().err
    wan = tmp_path / "wan"
    for d in ("transformer", "vae", "text_encoder", "tokenizer"):
        (wan / d).mkdir(parents=True)
    assert main(["--exp", "saber_full", "--scale", "14B", "--wan-dir", str(wan), f"logging.runs_dir={tmp_path}"]) == 2
    assert "SHARDS" in capsys.readouterr().err
    assert main(["--exp", "saber_full", "--scale", "tiny", "--shards", str(tmp_path / "none-{0..3}.tar"),
                 f"logging.runs_dir={tmp_path}"]) == 2
    assert "SHARDS" in capsys.readouterr().err


def test_resolved_config_roundtrips() -> None:
    cfg = load_config("saber_full", "mini")
    again = load_config("saber_full", "mini")
    assert dataclasses.asdict(cfg) == dataclasses.asdict(again)
