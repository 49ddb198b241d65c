"""Typed experiment configuration: YAML files composed into validated dataclasses.

An experiment is resolved from three layers, each a YAML mapping merged over the previous one:

1. the dataclass defaults (the paper's values, defined next to the code that uses them),
2. the *scale* (``experiments/scales/<scale>.yaml``: model size, resolution, frames, batch, devices,
   strategy, precision, data source),
3. the *experiment* (``experiments/<exp>.yaml``, the method; an ablation names ``parent: saber_full``
   and lists only what differs), then command-line overrides ``key.sub=value``.

Unknown keys and wrong types fail at start-up naming the dotted key (litgpt / nanoGPT style).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from saber_pl.augment import AugmentConfig
from saber_pl.datamodule import DataConfig
from saber_pl.flow import FlowConfig
from saber_pl.masks import MaskConfig
from saber_pl.paths import ROOT
from saber_pl.sampling import SampleConfig
from saber_pl.wan import ModelConfig

EXPERIMENTS_DIR = ROOT / "experiments"  # the checkout's experiments/, or the copy inside an installed wheel


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the dotted key."""


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon + AdamW: `optim.name`) and its schedule (the paper: AdamW, lr 1e-5)."""

    # adamw (the paper), or muon: torch's Muon on the blocks' 2-D weights, AdamW on the rest (saber_pl/optim.py)
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 1e-5  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    eps: float = 1e-8  # AdamW epsilon
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum, name=muon only
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: constant, or cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr, reached at trainer.max_steps
    grad_clip: float | None = 1.0  # max global grad norm (None = no clipping, the norm is still logged)
    ema: bool = False  # keep an EMA of the DiT weights (exported instead of the raw weights)
    ema_decay: float = 0.999  # EMA decay per optimizer step
    ema_start_step: int = 0  # first step at which the EMA is updated (it copies the weights before)

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "muon"):
            raise ConfigError(f"optim.name must be adamw or muon, got {self.name!r}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must be in (0, 1), got {self.ema_decay}")


@dataclass
class TrainerConfig:
    """Devices, strategy, precision and loop lengths (Lightning ``Trainer`` arguments)."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int | str = "auto"  # devices per node ("auto" = all visible)
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "fsdp2"] = "auto"  # fsdp2 = Lightning ModelParallelStrategy + fully_shard
    precision: Literal["auto", "32-true", "bf16-mixed", "bf16-true"] = "auto"  # auto: bf16-mixed on GPU, 32 on CPU
    max_steps: int = 1000
    max_time_minutes: float | None = None  # stop after this wall time (None = no limit)
    accumulate_grad_batches: int = 1
    global_batch: int | None = None  # clips per optimizer step over all ranks: derives accumulate_grad_batches
    log_every_n_steps: int = 10
    val_every_n_steps: int | None = None  # None = no validation loop
    limit_val_batches: int = 2
    ckpt_every_n_steps: int = 200
    keep_top_k: int = 2  # checkpoints kept by val/loss (or the newest k without validation)
    max_nonfinite_in_row: int = 10  # consecutive non-finite losses before stopping with an error
    collective_timeout_s: float = 600.0  # process-group timeout (ddp/fsdp2): a rank waiting longer on the others fails
    seed: int = 0
    deterministic: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_every_n_steps", "ckpt_every_n_steps", "num_nodes",
                     "accumulate_grad_batches", "max_nonfinite_in_row"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch is not None and self.global_batch < 1:
            raise ConfigError(f"trainer.global_batch must be >= 1 or null, got {self.global_batch}")
        if isinstance(self.devices, str) and self.devices != "auto":
            raise ConfigError(f"trainer.devices must be an int or 'auto', got {self.devices!r}")
        if self.collective_timeout_s <= 0:
            raise ConfigError(f"trainer.collective_timeout_s must be > 0, got {self.collective_timeout_s}")


@dataclass
class LoggingConfig:
    """TensorBoard media and run folder."""

    runs_dir: str = "runs"  # run folder = <runs_dir>/<exp>-<scale>/
    image_every_n_steps: int = 100  # masked references + masks written to TensorBoard every N steps
    timestep_buckets: int = 4  # train/loss_t<i>: loss per equal-width bucket of t in [0, 1]
    val_videos: int = 2  # sample videos generated at each validation (rank 0)
    val_sample_steps: int = 10  # sampler steps for the validation videos
    val_guidance: float | None = None  # CFG scale for the validation videos (None: the run's sample.guidance)
    val_fps: int = 8  # fps of the TensorBoard videos

    def __post_init__(self) -> None:
        if self.image_every_n_steps < 1 or self.timestep_buckets < 1:
            raise ConfigError("logging.image_every_n_steps and logging.timestep_buckets must be >= 1")


@dataclass
class ExperimentConfig:
    """The whole resolved configuration of one run."""

    exp: str = "saber_full"  # experiment name (method axis)
    scale: str = "mini"  # scale name (size axis)
    description: str = ""  # what this experiment changes, one line
    masks: MaskConfig = field(default_factory=MaskConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.optim.name == "muon" and self.trainer.strategy == "fsdp2":
            # torch's Muon orthogonalises whole matrices; under fully_shard each rank holds row shards
            raise ConfigError("optim.name=muon is not supported with trainer.strategy=fsdp2 (sharded matrices); "
                              "use adamw")

    @property
    def run_name(self) -> str:
        """`<exp>-<scale>`: the run folder name, identical on every rank."""
        return f"{self.exp}-{self.scale}"

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.runs_dir) / self.run_name


# ----------------------------------------------------------------------------------------------
# dict -> dataclass with validation (hand-written: no dependency does strict typed YAML into
# nested dataclasses with dotted-key errors without pulling in a large framework).


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it (lists become tuples where typed so)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key}: {value!r} is not of type {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)} for {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError naming them."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key '{dotted}' (valid: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        where = f" in '{prefix}'" if prefix else ""
        raise ConfigError(f"invalid config{where}: {err}") from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain YAML-able dict of a (nested) dataclass; tuples become lists."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


# ----------------------------------------------------------------------------------------------
# YAML composition


def deep_merge(base: dict[str, Any], delta: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: mappings merge key by key, everything else in ``delta`` replaces."""
    out = dict(base)
    for key, value in delta.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def list_experiments(root: Path = EXPERIMENTS_DIR) -> list[str]:
    return sorted(p.stem for p in root.glob("*.yaml"))


def list_scales(root: Path = EXPERIMENTS_DIR) -> list[str]:
    return sorted(p.stem for p in (root / "scales").glob("*.yaml"))


def experiment_layers(exp: str, root: Path = EXPERIMENTS_DIR) -> list[dict[str, Any]]:
    """The experiment's YAML chain, root parent first (``parent:`` links, cycles rejected)."""
    chain: list[dict[str, Any]] = []
    seen: set[str] = set()
    name: str | None = exp
    while name is not None:
        if name in seen:
            raise ConfigError(f"experiment parent cycle through '{name}'")
        seen.add(name)
        path = root / f"{name}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown experiment '{name}' (have: {', '.join(list_experiments(root))})")
        layer = _read_yaml(path)
        name = layer.pop("parent", None)
        chain.append(layer)
    return chain[::-1]


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` (value parsed as YAML) -> nested mapping."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(exp: str, scale: str, overrides: list[str] | tuple[str, ...] = (),
                root: Path | str = EXPERIMENTS_DIR) -> ExperimentConfig:
    """Compose defaults <- scale <- experiment chain <- overrides into a validated ExperimentConfig."""
    root = Path(root)
    scale_path = root / "scales" / f"{scale}.yaml"
    if not scale_path.is_file():
        raise ConfigError(f"unknown scale '{scale}' (have: {', '.join(list_scales(root))})")
    merged: dict[str, Any] = _read_yaml(scale_path)
    for layer in experiment_layers(exp, root):
        merged = deep_merge(merged, layer)
    for text in overrides:
        merged = deep_merge(merged, parse_override(text))
    merged["exp"] = exp
    merged["scale"] = scale
    return from_dict(ExperimentConfig, merged)


def save_config(cfg: ExperimentConfig, path: Path | str) -> None:
    """Write the resolved config as YAML (done before step 0, in the run folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(path)


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
