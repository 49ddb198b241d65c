"""SaberTransformer: stock equivalence, packed == dense-masked forward, mask invariances, timesteps, I2V."""

import copy

import pytest
import torch
from diffusers import WanTransformer3DModel

from saber_pl.dit import SaberTransformer, saber_in_channels
from saber_pl.wan import SCALES, i2v_dit

DIT = SCALES["tiny"]().dit
C, F_LAT, H, W, L = 16, 2, 8, 8, 6


def stock_model() -> WanTransformer3DModel:
    return WanTransformer3DModel(**DIT).eval()


def saber(**kw) -> SaberTransformer:
    torch.manual_seed(1)
    return SaberTransformer(stock_model(), **kw)


def batch(counts=(2, 0, 3), kmax=3, empty_sample=None):
    """Random inputs; references have patchy coverage; `empty_sample` gets all-invalid references."""
    b = len(counts)
    z = torch.randn(b, C, F_LAT, H, W)
    t = torch.rand(b) * 1000
    text = torch.randn(b, L, DIT["text_dim"])
    refs = torch.randn(b, kmax, C, H, W)
    cov = (torch.rand(b, kmax, 1, H // 2, W // 2) < 0.5).float().repeat_interleave(2, -1).repeat_interleave(2, -2)
    cov = (cov * (0.6 + 0.4 * torch.rand_like(cov))).clamp(0, 1)  # graded coverage, patches mostly one side of 0.5
    if empty_sample is not None:
        cov[empty_sample] = 0.0
    return z, t, text, refs, cov, torch.tensor(counts)


def test_no_references_equals_stock_wan():
    stock = stock_model()
    model = SaberTransformer(copy.deepcopy(stock))
    w = model.wan.patch_embedding.weight
    assert w.shape[1] == saber_in_channels(C) and not w[:, C:].any()  # new input channels start at zero
    z, t, text, refs, cov, _ = batch()
    want = stock(z, t, text).sample
    torch.testing.assert_close(model(z, t, text), want, atol=1e-6, rtol=1e-6)
    counts0 = torch.zeros(3, dtype=torch.long)  # padded reference slots only
    torch.testing.assert_close(model(z, t, text, refs, cov, counts0), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ref_timestep", ["shared", "zero"])
@pytest.mark.parametrize("ref_attn_mask", [True, False])
def test_packed_forward_equals_dense_masked_reference(ref_timestep, ref_attn_mask):
    model = saber(ref_timestep=ref_timestep, ref_attn_mask=ref_attn_mask)
    inputs = batch(counts=(2, 0, 3, 1), kmax=3, empty_sample=3)
    packed = model(*inputs)
    packed.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    dense = model(*inputs, dense_reference=True)
    dense.square().mean().backward()
    torch.testing.assert_close(packed, dense, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_batch_equals_each_sample_alone():
    model = saber(ref_timestep="zero")
    z, t, text, refs, cov, counts = batch(counts=(2, 0, 3))
    out = model(z, t, text, refs, cov, counts)
    for i in range(3):
        alone = model(z[i : i + 1], t[i : i + 1], text[i : i + 1], refs[i : i + 1], cov[i : i + 1], counts[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def half_mask_batch():
    z, t, text, refs, _, _ = batch(counts=(1,), kmax=1)
    cov = torch.zeros(1, 1, 1, H, W)
    cov[..., : W // 2] = 1.0  # left half is the subject, right half gray background
    return z, t, text, refs, cov, torch.tensor([1])


def test_reference_pixels_outside_mask_do_not_matter():
    model = saber()
    z, t, text, refs, cov, counts = half_mask_batch()
    base = model(z, t, text, refs, cov, counts)
    outside, inside = refs.clone(), refs.clone()
    outside[..., W // 2 :] += 3.0
    inside[..., : W // 2] += 3.0
    torch.testing.assert_close(model(z, t, text, outside, cov, counts), base, atol=0, rtol=0)
    assert (model(z, t, text, inside, cov, counts) - base).abs().max() > 1e-3

    no_mask = SaberTransformer(copy.deepcopy(model.wan), ref_attn_mask=False)  # `no_attn_mask` ablation
    base = no_mask(z, t, text, refs, cov, counts)
    assert (no_mask(z, t, text, outside, cov, counts) - base).abs().max() > 1e-3


def test_padded_reference_slots_are_ignored():
    model = saber()
    z, t, text, refs, cov, counts = batch(counts=(1, 2), kmax=3)
    base = model(z, t, text, refs, cov, counts)
    changed = refs.clone()
    changed[0, 1:] += 5.0
    changed[1, 2:] += 5.0
    torch.testing.assert_close(model(z, t, text, changed, cov, counts), base, atol=0, rtol=0)


def test_zero_and_shared_reference_timestep():
    shared = saber(ref_timestep="shared")
    zero = SaberTransformer(copy.deepcopy(shared.wan), ref_timestep="zero")
    z, t, text, refs, cov, counts = batch(counts=(2, 1))
    assert (shared(z, t, text, refs, cov, counts) - zero(z, t, text, refs, cov, counts)).abs().max() > 1e-4
    torch.testing.assert_close(shared(z, t, text), zero(z, t, text), atol=0, rtol=0)


def test_reference_rope_indices_follow_the_video():
    """Reference j gets the RoPE rows of frame F + offset + j of a longer stock video."""
    for offset in (0, 3):
        model = saber(ref_rope_offset=offset)
        k = 2
        cos, sin = model._rope_table(F_LAT, k, H // 2, W // 2)
        stock_cos, stock_sin = model.wan.rope(torch.zeros(1, 1, F_LAT + offset + k, H, W))
        per_frame = (H // 2) * (W // 2)
        rows = list(range(F_LAT * per_frame)) + list(range((F_LAT + offset) * per_frame, (F_LAT + offset + k) * per_frame))
        assert torch.equal(cos, stock_cos[0, rows, 0]) and torch.equal(sin, stock_sin[0, rows, 0])


def test_gradient_checkpointing_gives_same_gradients():
    model = saber()
    inputs = batch()
    model(*inputs).square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.gradient_checkpointing = True
    model.train()
    model(*inputs).square().mean().backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


def test_i2v_weights_are_used_without_image_branch(tmp_path):
    i2v = WanTransformer3DModel(**i2v_dit(DIT))
    patch = i2v.patch_embedding.weight.detach().clone()
    model = SaberTransformer(i2v)
    assert torch.equal(model.wan.patch_embedding.weight, patch)  # 36-channel weights used as they are
    assert model.wan.condition_embedder.image_embedder is None
    assert all(b.attn2.add_k_proj is None and not hasattr(b.attn2, "norm_added_k") for b in model.wan.blocks)
    assert not any("add_k_proj" in n or "image_embedder" in n for n, _ in model.named_parameters())
    inputs = batch(counts=(1, 2))
    out = model(*inputs)
    model.wan.save_pretrained(tmp_path)  # a plain diffusers folder: 36 inputs, no image branch
    reloaded = SaberTransformer(WanTransformer3DModel.from_pretrained(tmp_path))
    assert reloaded.wan.config.image_dim is None and reloaded.wan.config.in_channels == saber_in_channels(C)
    torch.testing.assert_close(reloaded(*inputs), out, atol=1e-6, rtol=1e-6)


def test_input_validation():
    model = saber(max_refs=2)
    z, t, text, refs, cov, counts = batch(counts=(1, 3), kmax=3)
    with pytest.raises(ValueError, match="max_refs"):
        model(z, t, text, refs, cov, counts)
    with pytest.raises(ValueError, match="ref_counts"):
        model(z, t, text, refs[:, :2], cov[:, :2], torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="ref_latents"):
        model(z, t, text, refs[:, :2, :, :4], cov[:, :2], torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="timestep"):
        model(z, t[:1], text)
    with pytest.raises(ValueError, match="ref_timestep"):
        SaberTransformer(stock_model(), ref_timestep="one")


def test_sample_prediction_returns_the_velocity_of_the_predicted_clean_latent():
    """prediction=sample: the head's output is z0, forward returns (z_t - z0) / max(t, t_min), same weights."""
    model_v = saber()
    model_s = copy.deepcopy(model_v)
    model_s.prediction, model_s.prediction_t_min = "sample", 0.05
    z, t, text, refs, cov, counts = batch()
    t = torch.tensor([900.0, 300.0, 10.0])  # the last one is below t_min: clamped
    with torch.no_grad():
        head = model_v(z, t, text, refs, cov, counts)  # the raw output, read as a clean latent
        v = model_s(z, t, text, refs, cov, counts)
    want = (z - head) / torch.tensor([0.9, 0.3, 0.05]).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(v, want, atol=1e-5, rtol=1e-5)


def test_sample_prediction_under_bf16_converts_from_the_float32_noisy_latent():
    """bf16 compute: v = (z_t - z0) / t must use the float32 z_t the caller passed, not its bf16 copy
    (off by ~0.4 % of |z_t|, which the division by a small t amplifies)."""
    model = saber(prediction="sample").to(torch.bfloat16)
    z, _, text, *_ = batch()
    t = torch.tensor([900.0, 300.0, 50.0])
    with torch.no_grad():
        head = saber(prediction="velocity").to(torch.bfloat16)(z, t, text)  # the same weights' raw output
        v = model(z, t, text)
    t_col = (t / 1000).view(-1, 1, 1, 1, 1)
    assert torch.equal(v, ((z - head.float()) / t_col).bfloat16())
    assert not torch.equal(v, ((z.bfloat16().float() - head.float()) / t_col).bfloat16())  # the old conversion


def test_sample_prediction_of_the_true_clean_latent_gives_the_flow_target():
    """If the head outputs the true z0, the returned velocity is the flow-matching target eps - z0."""
    model = saber(prediction="sample")
    z0, eps = torch.randn(2, C, F_LAT, H, W), torch.randn(2, C, F_LAT, H, W)
    t = torch.tensor([0.8, 0.2])
    zt = (1 - t.view(-1, 1, 1, 1, 1)) * z0 + t.view(-1, 1, 1, 1, 1) * eps
    v = model.velocity_from_output(z0, zt, t * 1000)
    torch.testing.assert_close(v, eps - z0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        saber(prediction="epsilon")


def fit_pure_noise(model: SaberTransformer, target: torch.Tensor, steps: int = 200) -> float:
    """Train `model` (prediction=sample) at t = 1 to output `target` from fresh pure noise; held-out MSE.

    At t = 1 the input carries no information, so the best output is the mean clip. A translation
    equivariant DiT can only output the same value at every token; the layout of `target` needs
    absolute positions. (Measured: both sit at MSE 1.0 for ~100 steps; with sincos it falls to 0.01 by
    step 200, without it stays at 1.0; at lr 1e-2 the plain DiT finds the frame's edges through RoPE
    after ~300 steps: equivariance is broken only at the boundary, slowly.)
    """
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    b = target.shape[0]
    t = torch.full((b,), 1000.0)
    text = torch.zeros(b, L, DIT["text_dim"])
    for _ in range(steps):
        z = torch.randn(target.shape, generator=gen)
        x0 = z - model(z, t, text)  # prediction=sample at t = 1: v = z_t - z0
        loss = ((x0 - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = torch.randn(target.shape, generator=gen)
        return float(((z - model(z, t, text) - target) ** 2).mean())


def test_sincos_positions_let_a_dit_draw_a_layout_from_pure_noise():
    """The mean clip of a caption whose subject sits at a fixed place (mini's slides through the centre)
    is a layout: the left half bright, the right half dark, the last latent frame mirrored. Without
    absolute positions the DiT cannot draw it from noise (MSE stays near the target's variance, 1); with
    `position_embedding=sincos` it does, on the right side of the right frame."""
    target = torch.ones(2, C, F_LAT, H, W)
    target[..., W // 2:] = -1.0
    target[:, :, -1] = -target[:, :, -1]
    without = fit_pure_noise(saber(prediction="sample"), target)
    with_pos = fit_pure_noise(saber(prediction="sample", position_embedding="sincos"), target)
    assert without > 0.8, without
    assert with_pos < 0.25 * without, (with_pos, without)


def test_sincos_positions_touch_only_video_tokens_and_are_off_by_default():
    """Default: the stock Wan forward (test_no_references_equals_stock_wan). With sincos the video output
    changes, and references still enter only through their mask channels and RoPE index."""
    plain, pos = saber(), saber(position_embedding="sincos")
    assert plain.position_embedding == "none"
    z, t, text, refs, cov, counts = batch()
    with torch.no_grad():
        assert not torch.allclose(plain(z, t, text, refs, cov, counts), pos(z, t, text, refs, cov, counts))
        dense = pos(z, t, text, refs, cov, counts, dense_reference=True)
        torch.testing.assert_close(pos(z, t, text, refs, cov, counts), dense, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="position_embedding"):
        saber(position_embedding="learned")
