"""The DiT's optimizer: AdamW (the paper), or Muon on the blocks' matrices with AdamW for the rest.

`optim.name: muon` is a scale knob for the CPU-sized mini DiT, where steps are what is scarce: Muon
(Jordan et al. 2024; `torch.optim.Muon`) orthogonalises each hidden weight matrix's momentum by a few
Newton-Schulz iterations, so every direction of the matrix moves at the same rate. `Muon` is
`torch.optim.Muon` with the iterations in a chosen dtype (torch runs them in bfloat16, which an AVX2 CPU
emulates: the mini step took 4x longer). `torch.optim.Muon` takes 2-D parameters only, and Lightning's automatic optimization steps one optimizer, so
`MuonAdamW` holds the two torch optimizers behind one `Optimizer`; the parameter groups are the inner
optimizers' own dicts, so the lr scheduler and gradient clipping reach both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from saber_pl.config import OptimConfig


def newton_schulz(g: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> Tensor:  # [A, B] -> [A, B], singular values ~1
    """The quintic Newton-Schulz iteration of `torch.optim.Muon`, computed in `dtype` (torch: bfloat16)."""
    a, b, c = coefficients
    x = g.to(dtype)
    if g.size(0) > g.size(1):
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if g.size(0) > g.size(1) else x).to(g.dtype)


def adjusted_lr(lr: float, shape: torch.Size) -> float:
    """Muon's step size for one matrix, Moonshot's match_rms_adamw (AdamW's lr means the same here)."""
    return lr * 0.2 * math.sqrt(max(shape[0], shape[1]))


def _closure_loss(closure: Callable[[], Any] | None) -> Any:
    """The loss of an optimizer's closure (re-evaluated with gradients on), None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` (Nesterov momentum, decoupled weight decay, match_rms_adamw step size) whose
    Newton-Schulz iterations run in `ns_dtype`: float32 on the CPU, bfloat16 (torch's choice) on CUDA."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float, weight_decay: float, momentum: float,
                 ns_dtype: torch.dtype | None = None) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                         adjust_lr_fn="match_rms_adamw")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, mu = float(group["lr"]), group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"].lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                dtype = self.ns_dtype or (torch.bfloat16 if p.device.type == "cuda" else torch.float32)
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-adjusted_lr(lr, p.shape))
        return loss


def muon_parameters(dit: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon, AdamW) split of the trainable DiT parameters: Muon for the 2-D weights inside the
    transformer blocks (attention and feed-forward projections), AdamW for the rest (patch embedding,
    condition embedders, output head, norms, biases, modulation tables), as Muon's authors use it."""
    muon, adamw = [], []
    for name, p in dit.named_parameters():
        if not p.requires_grad:
            continue
        (muon if p.ndim == 2 and ".blocks." in f".{name}" else adamw).append(p)
    return muon, adamw


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over two: `Muon` for `muon_params`, `torch.optim.AdamW` for the rest."""

    def __init__(self, muon_params: list[nn.Parameter], adamw_params: list[nn.Parameter], o: OptimConfig) -> None:
        if not muon_params:
            raise ValueError("optim.name=muon found no 2-D weight inside the DiT's blocks")
        self.muon = Muon(muon_params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.muon_momentum)
        self.adamw = torch.optim.AdamW(adamw_params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        super().__init__([*muon_params, *adamw_params], {"lr": o.lr})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups  # the same dicts: one lr schedule

    @property
    def inner(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return self.muon, self.adamw

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = _closure_loss(closure)
        for opt in self.inner:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.inner:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self) -> dict:  # type: ignore[override]  # both inner states, keyed by parameter
        return {**self.muon.state, **self.adamw.state}

    @state.setter
    def state(self, value: dict) -> None:  # Optimizer.__init__ assigns an empty one
        pass


def build_optimizer(dit: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `optim.name` names over the DiT's trainable parameters."""
    if o.name == "adamw":
        params: Iterable[nn.Parameter] = [p for p in dit.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    return MuonAdamW(*muon_parameters(dit), o)
