"""The package installs the standard way and works outside the checkout.

A wheel (``pip wheel --no-deps``) carries the code, every YAML config and the test shard; installed
into a fresh venv it loads configs, dry-runs and trains scale ``tiny`` from an unrelated directory.
An editable install (``pip install -e``, what the Makefile does) resolves the same files in the
checkout from anywhere. The fresh venvs see this environment's packages (torch, ...) through a
``.pth`` line, so nothing is downloaded and only saber_pl itself is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_SOURCE = {".git", ".venv", "runs", "build", "dist", ".pytest_cache", "__pycache__", "lightning_logs"}
CONSOLE_SCRIPTS = ("saber-train", "saber-generate", "saber-export", "saber-eval", "saber-pack-shards")

# What a user's first commands touch: the configs, the tiny shard through the data path, and the
# missing-data message of scale mini (data/embedded/ is built into a checkout, never shipped).
PROBE = """
import json, saber_pl
from saber_pl.config import EXPERIMENTS_DIR, load_config
from saber_pl.datamodule import expand_shards
from saber_pl.train import SetupError, check_inputs
cfg = load_config('saber_full', 'tiny')
try:
    check_inputs(load_config('saber_full', 'mini'))
    mini_error = ''
except SetupError as err:
    mini_error = str(err)
print(json.dumps({'package': saber_pl.__file__, 'experiments': str(EXPERIMENTS_DIR),
                  'shards': expand_shards(cfg.data.train_shards), 'mini_error': mini_error}))
"""


def _copy_source(dst: Path) -> Path:
    """The checkout without its venv, runs and build outputs (the build writes into its source tree)."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in NOT_SOURCE or n.endswith(".egg-info")}
        if Path(folder).resolve() == ROOT / "data":
            skip.add("embedded")  # built by `make data`, git-ignored, large
        return skip

    shutil.copytree(ROOT, dst, ignore=ignore)
    return dst


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PIP_NO_INPUT="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _fresh_venv(path: Path) -> Path:
    """A venv with no saber_pl whose interpreter also sees this environment's site-packages; its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=path).stdout
    # Plain path lines: appended after the venv's own site-packages, their .pth files (an editable
    # saber_pl of this environment) are not run, so the venv's saber_pl is the one imported.
    (Path(purelib.strip()) / "_parent_env.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def _pip_into(python: Path, *args: str, cwd: Path) -> None:
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--no-build-isolation", "-q", *args], cwd=cwd)


def _probe(python: Path, cwd: Path) -> dict:
    return json.loads(_run([str(python), "-c", PROBE], cwd=cwd).stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy_source(tmp_path_factory.mktemp("install") / "src")


def test_wheel_ships_code_configs_and_shard_and_runs_outside_the_checkout(source: Path, tmp_path: Path) -> None:
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "dist"), str(source)], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("saber_pl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(source).as_posix() for p in (source / "saber_pl").rglob("*.py")}
    configs = {"saber_pl/share/" + p.relative_to(source).as_posix() for p in (source / "experiments").rglob("*.yaml")}
    missing = sorted(modules - names)
    assert modules and not missing, f"modules missing from the wheel (list their package in setup.cfg): {missing}"
    assert configs and not configs - names, sorted(configs - names)
    assert "saber_pl/share/data/test/tiny-000000.tar" in names
    assert not any(n.startswith(("tests/", "data/", "experiments/", "saber_pl/share/data/embedded")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert all(f"{s} = " in scripts for s in CONSOLE_SCRIPTS), scripts

    python = _fresh_venv(tmp_path / "venv")
    _pip_into(python, str(wheel), cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"  # not the checkout, no experiments/ or data/ here
    elsewhere.mkdir()
    share = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                      cwd=elsewhere).stdout.strip()) / "saber_pl" / "share"
    got = _probe(python, elsewhere)
    assert Path(got["package"]).is_relative_to(tmp_path / "venv"), got
    assert got["experiments"] == str(share / "experiments")
    assert got["shards"] == [str(share / "data" / "test" / "tiny-000000.tar")]
    assert "training shards not found: data/embedded/" in got["mini_error"] and "make data" in got["mini_error"]

    dry = _run([str(python), "-m", "saber_pl.train", "--exp", "saber_full", "--scale", "tiny", "--dry-run"],
               cwd=elsewhere)
    assert "exp: saber_full" in dry.stdout and "train_shards: data/test/tiny-000000.tar" in dry.stdout
    # The console script trains one step on the shipped shard and writes the run folder under the CWD.
    _run([str(tmp_path / "venv" / "bin" / "saber-train"), "--exp", "saber_full", "--scale", "tiny",
          "trainer.max_steps=1"], cwd=elsewhere)
    assert (elsewhere / "runs" / "saber_full-tiny" / "checkpoints" / "last.ckpt").exists()


def test_editable_install_finds_the_checkout_from_anywhere(source: Path, tmp_path: Path) -> None:
    python = _fresh_venv(tmp_path / "venv")
    _pip_into(python, "-e", str(source), cwd=tmp_path)
    got = _probe(python, tmp_path)
    assert got["package"] == str(source / "saber_pl" / "__init__.py"), got
    assert got["experiments"] == str(source / "experiments")
    assert got["shards"] == [str(source / "data" / "test" / "tiny-000000.tar")]
    assert "training shards not found: data/embedded/" in got["mini_error"]
