"""Reference-to-video sampling with diffusers' flow-matching schedulers and classifier-free guidance.

The DiT predicts the flow velocity eps - z0 (Wan's ``flow_prediction``), so diffusers'
``UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=s)``
(Wan2.1's default sampler) and ``FlowMatchEulerDiscreteScheduler(shift=s)`` step it directly.
Guidance runs the conditional and unconditional branches; by default each sample of each branch is its own
b = 1 DiT pass (``split_passes``): a packed batch of 2B samples takes diffusers' per-token modulation path,
a [1, N, 6, D] tensor (about 4.6 GB in bf16 at 14B's 75k tokens) plus fp32 temporaries in every block,
while b = 1 broadcasts one [1, 6, D] modulation. The packed attention is block-diagonal per sample, so both
give the same velocities. The unconditional branch keeps the references unless ``drop_refs_uncond`` is set.
``reference_guidance`` adds a guidance term on the references alone (a third branch: the prompt without
references), as InstructPix2Pix composes guidance over two conditions (Brooks et al. 2023):
    v = v(T, R) + (s_T - 1) (v(T, R) - v(neg, R)) + (s_R - 1) (v(T, R) - v(T, none)).
The starting noise can be passed in (``noise``), so a caller can seed each sample on its own: a prompt
then gives the same video alone or inside a batch (``saber_pl.generate`` does this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch import Tensor
from tqdm.auto import tqdm

SCHEDULERS = ("unipc", "euler")


@dataclass
class SamplerConfig:
    """Inference knobs (SABER.md: 50 steps, CFG 5.0, Wan's shift 5.0)."""

    steps: int = 50  # sampler steps
    guidance: float = 5.0  # classifier-free guidance scale on the text (1.0 = no guidance)
    shift: float = 5.0  # Wan's flow shift
    scheduler: Literal["unipc", "euler"] = "unipc"
    # guide only the steps whose noise level t (timestep / 1000, after the shift) lies in [lo, hi]; the others
    # take the conditional velocity alone (one pass). (0, 1) = every step (Wan). Kynkäänniemi et al. 2024
    # ("Applying guidance in a limited interval"): guidance at high noise drives the layout off the data,
    # at low noise it changes little.
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    drop_refs_uncond: bool = False  # also drop the references in the unconditional branch
    # (ours) guidance scale on the references alone, on the steps of guidance_interval (1.0 = off; needs refs):
    # pushes the video away from what the prompt alone would make, towards the reference's subject
    reference_guidance: float = 1.0
    split_passes: bool = True  # one b=1 DiT pass per sample and branch (less memory), else one packed batch

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        if self.reference_guidance < 0:
            raise ValueError(f"reference_guidance must be >= 0, got {self.reference_guidance}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        self.guidance_interval = check_interval(self.guidance_interval)

    def guides(self, timestep: float) -> bool:
        """Whether the step at `timestep` (in [0, 1000]) runs the unconditional branch too."""
        return self.guidance != 1.0 and self.in_interval(timestep)

    def guides_references(self, timestep: float) -> bool:
        """Whether the step at `timestep` (in [0, 1000]) runs the prompt-without-references branch too."""
        return self.reference_guidance != 1.0 and self.in_interval(timestep)

    def in_interval(self, timestep: float) -> bool:
        """Whether `timestep` (in [0, 1000]) lies in guidance_interval."""
        lo, hi = self.guidance_interval
        return lo <= timestep / 1000.0 <= hi


def check_interval(interval: object) -> tuple[float, float]:
    """A guidance interval as (lo, hi) with 0 <= lo <= hi <= 1, else ValueError."""
    try:
        lo, hi = (float(v) for v in interval)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be [lo, hi], got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {[lo, hi]}")
    return lo, hi


@dataclass
class SampleConfig:
    """A run's sampling defaults (config section `sample`): what `generate`, the validation videos and
    bench-mini use unless a flag overrides them. No shift here: a run samples at the `flow.shift` it trained with.

    The paper's values (50 steps, CFG 5.0: Wan's) are the defaults; a scale may set its own, as mini sets CFG 1
    (docs/bench_mini.md, ninth round: its small DiT follows the text without guidance, and CFG 5 overshoots).
    """

    steps: int = 50  # sampler steps
    guidance: float = 5.0  # classifier-free guidance scale on the text (1.0 = no guidance)
    scheduler: Literal["unipc", "euler"] = "unipc"
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # noise levels t that are guided (SamplerConfig)
    reference_guidance: float = 1.0  # (ours) guidance scale on the references alone (SamplerConfig); 1.0 = off
    # (ours) subject references shown with their bounding box at this fraction of the frame's shorter side
    # (`ReferenceConfig.subject_size`); None = the paper's fit of the whole image. Mini sets 0.35, a little below
    # the size its training clips show subjects at (0.47): its DiT draws the subject about as large as shown, or larger.
    reference_size: float | None = None

    def __post_init__(self) -> None:
        self.guidance_interval = tuple(self.guidance_interval)  # type: ignore[assignment]  (YAML gives a list)
        self.sampler(1.0)  # SamplerConfig's checks, naming the field
        if self.reference_size is not None and not 0.0 < self.reference_size <= 1.0:
            raise ValueError(f"reference_size must be in (0, 1] (a fraction of the frame's shorter side) or null, "
                             f"got {self.reference_size}")

    def sampler(self, shift: float, **overrides: object) -> SamplerConfig:
        """These defaults at `shift`, each field replaced by a non-None override of the same name."""
        given = {k: v for k, v in overrides.items() if v is not None}
        fields = {"steps": self.steps, "guidance": self.guidance, "scheduler": self.scheduler,
                  "guidance_interval": self.guidance_interval, "reference_guidance": self.reference_guidance} | given
        return SamplerConfig(shift=shift, **fields)


def make_scheduler(name: str, shift: float) -> FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler:
    """A fresh diffusers flow-matching scheduler with Wan's shift."""
    if name == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                       num_train_timesteps=1000)
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    raise ValueError(f"scheduler must be 'unipc' or 'euler', got {name!r}")


def velocity(dit: torch.nn.Module, x: Tensor, t: Tensor, text: Tensor, refs: Tensor | None, cov: Tensor | None,
             counts: Tensor | None, split: bool) -> Tensor:
    """The DiT's velocity for a batch, as one pass or as one b = 1 pass per sample  # [B, C, f, h, w] float32."""
    if not split or x.shape[0] == 1:
        return dit(x, t, text, refs, cov, counts).float()
    out = []
    for i in range(x.shape[0]):
        one = slice(i, i + 1)
        k = 0 if refs is None else (int(counts[i]) if counts is not None else refs.shape[1])
        r = refs[one, :k] if k else None  # this sample's real references only
        c = cov[one, :k] if k and cov is not None else None
        n = torch.full((1,), k, dtype=torch.long, device=x.device) if k else None
        out.append(dit(x[one], t[one], text[one], r, c, n).float())
    return torch.cat(out)


def _stack(branches: list[tuple]) -> tuple:
    """The branches' inputs (text, refs, coverage, counts) concatenated along the batch; None stays None."""
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*branches))


@torch.no_grad()
def sample_latents(dit: torch.nn.Module, shape: tuple[int, ...], text_emb: Tensor, neg_emb: Tensor | None,
                   ref_latents: Tensor | None, ref_coverage: Tensor | None, ref_counts: Tensor | None,
                   cfg: SamplerConfig, generator: torch.Generator | None = None, progress: bool = True,
                   noise: Tensor | None = None) -> Tensor:
    """Denoise from Gaussian noise to clean latents  # shape = [B, C, f, h, w] -> [B, C, f, h, w].

    text_emb / neg_emb [B, L, D]; ref_latents [B, K, C, h, w]; ref_coverage [B, K, 1, h, w]; ref_counts [B].
    `noise` [B, C, f, h, w] is the starting point; None = drawn here from `generator`.
    """
    device = text_emb.device
    dtype = text_emb.dtype
    if noise is None:
        latents = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have shape {tuple(shape)}, got {tuple(noise.shape)}")
    else:
        latents = noise.to(device=device, dtype=torch.float32)
    scheduler = make_scheduler(cfg.scheduler, cfg.shift)
    scheduler.set_timesteps(cfg.steps, device=device)
    can_guide = neg_emb is not None and cfg.guidance != 1.0
    cond = (text_emb, ref_latents, ref_coverage, ref_counts)
    text_uncond = None
    if can_guide:
        keep = ref_counts if ref_latents is None or not cfg.drop_refs_uncond else torch.zeros_like(ref_counts)
        text_uncond = (neg_emb, ref_latents, ref_coverage, keep)
    no_refs = None
    if ref_latents is not None and cfg.reference_guidance != 1.0:
        no_refs = (text_emb, ref_latents, ref_coverage, torch.zeros_like(ref_counts))  # count 0: refs unseen
    for t in tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False):
        branches = [cond]  # this step's branches, stacked along the batch
        if text_uncond is not None and cfg.guides(float(t)):
            branches.append(text_uncond)
        if no_refs is not None and cfg.guides_references(float(t)):
            branches.append(no_refs)
        x = torch.cat([latents] * len(branches))
        tt = t.expand(x.shape[0]).to(device=device, dtype=torch.float32)
        v = velocity(dit, x.to(dtype), tt, *_stack(branches), cfg.split_passes).chunk(len(branches))
        out = v[0]
        for branch, vb in zip(branches[1:], v[1:]):
            scale = cfg.guidance if branch is text_uncond else cfg.reference_guidance
            out = out + (scale - 1.0) * (v[0] - vb)  # = vb + scale (v[0] - vb)
        latents = scheduler.step(out, t, latents, return_dict=False)[0]
    return latents
