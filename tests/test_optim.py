"""optim.name: AdamW (the paper) and Muon + AdamW behind one optimizer (saber_pl/optim.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from saber_pl.config import ConfigError, load_config
from saber_pl.module import SaberModule, lr_factor
from saber_pl.optim import Muon, MuonAdamW, muon_parameters


def _module(*overrides: str) -> SaberModule:
    torch.manual_seed(0)
    return SaberModule(load_config("saber_full", "tiny", list(overrides)))


def _fake_grads(module: SaberModule, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in module.dit.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def test_split_puts_every_trainable_parameter_in_exactly_one_optimizer() -> None:
    dit = _module().dit
    muon, adamw = muon_parameters(dit)
    ids = [id(p) for p in muon + adamw]
    assert len(ids) == len(set(ids)) == sum(1 for p in dit.parameters() if p.requires_grad)
    assert muon and all(p.ndim == 2 for p in muon)
    names = {id(p): n for n, p in dit.named_parameters()}
    assert all(".blocks." in f".{names[id(p)]}" for p in muon)
    # the head, the embedders and the patch embedding stay on AdamW
    assert any("proj_out" in names[id(p)] for p in adamw) and any("patch_embedding" in names[id(p)] for p in adamw)


def _muon_pair(ns_dtype: torch.dtype) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(3)
    shapes = [(64, 32), (32, 128), (48, 48)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    return ours, [torch.nn.Parameter(p.detach().clone()) for p in ours]


def _step_both(ours: list, theirs: list, ns_dtype: torch.dtype, steps: int = 4) -> None:
    opts = [Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.95, ns_dtype=ns_dtype),
            torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn="match_rms_adamw")]
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        for opt in opts:
            opt.step()


def test_muon_in_bfloat16_is_torch_muon_to_the_bit() -> None:
    ours, theirs = _muon_pair(torch.bfloat16)
    _step_both(ours, theirs, torch.bfloat16)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_muon_in_float32_matches_torch_muon_to_bfloat16_precision() -> None:
    """The CPU path (fp32 iterations) against torch's bf16 ones: same update up to bf16 rounding."""
    ours, theirs = _muon_pair(torch.float32)
    start = [p.detach().clone() for p in ours]
    _step_both(ours, theirs, torch.float32)
    for a, b, s in zip(ours, theirs, start):
        moved = (b - s).norm()
        assert moved > 0.01
        assert (a - b).norm() < 0.02 * moved


def test_muon_adamw_steps_exactly_as_its_two_optimizers_would() -> None:
    """The wrapper adds nothing to the update: same result as Muon and AdamW stepped by hand."""
    module = _module("optim.name=muon", "optim.lr=0.01", "optim.warmup_steps=0")
    reference = copy.deepcopy(module.dit)
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, MuonAdamW)
    o = module.cfg.optim
    ref_muon, ref_adamw = muon_parameters(reference)
    by_hand = [Muon(ref_muon, lr=o.lr, weight_decay=o.weight_decay, momentum=o.muon_momentum),
               torch.optim.AdamW(ref_adamw, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)]
    for step in range(3):
        _fake_grads(module, step)
        g = torch.Generator().manual_seed(step)
        for p in reference.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        for inner in by_hand:
            inner.step()
    for (name, a), b in zip(module.dit.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_muon_moves_every_block_matrix_at_the_mini_lr_and_the_schedule_reaches_both() -> None:
    """Under the real schedule (mini's lr 1e-3, warm-up 50) each block matrix moves, by AdamW's step size."""
    module = _module("optim.name=muon", "optim.lr=1e-3", "optim.warmup_steps=50", "optim.schedule=cosine",
                     "trainer.max_steps=1200")
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    muon, _ = muon_parameters(module.dit)
    before = [p.detach().clone() for p in muon]
    for step in range(10):
        _fake_grads(module, step)
        opt.step()
        sched.step()
    assert opt.muon.param_groups[0]["lr"] == opt.adamw.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(module.cfg.optim, 1200, 10))
    for p, b in zip(muon, before):
        rms = (p.detach() - b).pow(2).mean().sqrt().item()
        # match_rms_adamw: 0.2-RMS steps at the warm-up lrs (1..10)/50 * 1e-3 sum to ~2.2e-4 at most
        assert 1e-5 < rms < 1e-3


def test_state_dict_round_trip_resumes_the_same_trajectory() -> None:
    a = _module("optim.name=muon", "optim.lr=0.01")
    opt_a = a.configure_optimizers()["optimizer"]
    for step in range(2):
        _fake_grads(a, step)
        opt_a.step()
    b = _module("optim.name=muon", "optim.lr=0.01")
    b.dit.load_state_dict(a.dit.state_dict())
    opt_b = b.configure_optimizers()["optimizer"]
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert len(opt_b.state) == len(opt_a.state) > 0  # momentum buffers came back
    for opt, module in ((opt_a, a), (opt_b, b)):
        _fake_grads(module, 7)
        opt.step()
    for (name, p), q in zip(a.dit.named_parameters(), b.dit.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_adamw_stays_the_default_and_bad_names_are_refused() -> None:
    assert type(_module().configure_optimizers()["optimizer"]) is torch.optim.AdamW
    with pytest.raises(ConfigError, match="optim.name"):
        load_config("saber_full", "tiny", ["optim.name=sgd"])
    with pytest.raises(ConfigError, match="fsdp2"):
        load_config("saber_full", "tiny", ["optim.name=muon", "trainer.strategy=fsdp2"])


def test_resuming_a_run_under_another_optimizer_is_refused_with_how_to_go_on(tmp_path) -> None:
    """An AdamW checkpoint cannot seed Muon's state: the resume says so instead of failing in Lightning."""
    from saber_pl.config import save_config
    from saber_pl.train import check_same_optimizer

    saved = tmp_path / "config.yaml"
    save_config(load_config("saber_full", "tiny"), saved)
    check_same_optimizer(saved, load_config("saber_full", "tiny"), tmp_path / "last.ckpt")  # same: fine
    with pytest.raises(ConfigError, match="optim.name=adamw.*logging.runs_dir"):
        check_same_optimizer(saved, load_config("saber_full", "tiny", ["optim.name=muon"]), tmp_path / "last.ckpt")


def test_muon_trains_checkpoints_and_resumes_through_lightning(tmp_path) -> None:
    """The real loop (train.fit, Lightning's automatic optimization, checkpoints): the block matrices move,
    the checkpoint holds Muon's momentum for each of them, and a resumed run restores it and goes on."""
    from saber_pl.train import fit

    base = [f"logging.runs_dir={tmp_path}", "optim.name=muon", "optim.lr=2e-3", "trainer.ckpt_every_n_steps=3",
            "trainer.val_every_n_steps=1000", "logging.image_every_n_steps=1000"]
    cfg = load_config("saber_full", "tiny", [*base, "trainer.max_steps=3"])
    init = SaberModule(cfg).dit.state_dict()  # the same seeded random weights fit starts from
    assert fit(cfg) == 0
    ckpt = torch.load(cfg.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = ckpt["optimizer_states"][0]
    n_matrices = len(muon_parameters(SaberModule(cfg).dit)[0])
    assert len(state["muon"]["state"]) == n_matrices and state["adamw"]["state"]
    assert all(s["momentum_buffer"].abs().sum() > 0 for s in state["muon"]["state"].values())
    trained = {k[len("dit."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("dit.")}
    moved = [k for k, v in init.items() if v.ndim == 2 and ".blocks." in f".{k}" and not torch.equal(v, trained[k])]
    assert len(moved) == n_matrices
    assert fit(load_config("saber_full", "tiny", [*base, "trainer.max_steps=5"])) == 0
    resumed = torch.load(cfg.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 5
