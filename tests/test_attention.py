"""Packed attention equals plain dense-masked attention, forward and backward; backend selection."""

import logging

import pytest
import torch

from saber_pl import attention
from saber_pl.attention import dense_mask, packed_attention, reference_attention, resolve_backend, sdpa_packed

H, DH, S_VID, S_REF = 2, 8, 12, 6


def make_valid(counts: list[int], kmax: int, keep_prob: list[float]) -> torch.Tensor:
    """Token validity [B, S_VID + kmax*S_REF]: video always; real references kept with a probability."""
    b = len(counts)
    valid = torch.ones(b, S_VID + kmax * S_REF, dtype=torch.bool)
    for i, (n, p) in enumerate(zip(counts, keep_prob)):
        refs = torch.rand(kmax, S_REF) < p
        refs[n:] = False  # padded slots
        valid[i, S_VID:] = refs.flatten()
    return valid


def dense_bss(q, k, v, valid):
    """Reference: per sample, explicit softmax over a dense [B, S, S] mask built from the validity."""
    mask = valid[:, None, :].expand(-1, valid.shape[1], -1)  # [B, S, S] query may see key
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / DH**0.5
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


CASES = [
    ([2, 0, 3], 3, [0.3, 0.5, 0.8]),  # different K, including K = 0
    ([1, 2], 2, [0.0, 0.6]),  # first sample: all references invalid
    ([0, 0], 0, [0.0, 0.0]),  # no references at all
    ([3], 3, [1.0]),  # single sample, all kept
]


@pytest.mark.parametrize("counts,kmax,keep", CASES)
def test_packed_equals_dense_forward_backward(counts, kmax, keep):
    valid = make_valid(counts, kmax, keep)
    b, s = valid.shape
    q, k, v = (torch.randn(b, s, H, DH, dtype=torch.float32, requires_grad=True) for _ in range(3))
    weight = torch.randn(b, s, H, DH) * valid[..., None, None]  # loss only on valid queries

    ref = dense_bss(q, k, v, valid)
    (ref * weight).sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None

    idx = valid.flatten().nonzero().squeeze(1)
    seqlens = valid.sum(1).tolist()
    qp, kp, vp = (t.flatten(0, 1)[idx].unsqueeze(0) for t in (q, k, v))
    out = sdpa_packed(qp, kp, vp, seqlens, seqlens)  # [1, N, H, DH]
    (out[0] * weight.flatten(0, 1)[idx]).sum().backward()

    torch.testing.assert_close(out[0], ref.flatten(0, 1)[idx], atol=1e-5, rtol=1e-5)
    for got, want in zip((q.grad, k.grad, v.grad), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not k.grad.flatten(0, 1)[~valid.flatten()].any()  # dropped keys are never read


@pytest.mark.parametrize("counts,kmax,keep", CASES)
def test_dense_mask_matches_xformers_block_diagonal(counts, kmax, keep):
    attn_bias = pytest.importorskip("xformers.ops.fmha.attn_bias")
    seqlens = make_valid(counts, kmax, keep).sum(1).tolist()
    text = [5] * len(seqlens)
    for kv in (seqlens, text):  # self- and cross-attention layouts
        bias = attn_bias.BlockDiagonalMask.from_seqlens(seqlens, kv).materialize((sum(seqlens), sum(kv)))
        assert torch.equal(torch.isfinite(bias), dense_mask(seqlens, kv))
        q = torch.randn(1, sum(seqlens), H, DH)
        kk, vv = torch.randn(2, 1, sum(kv), H, DH).unbind(0)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / DH**0.5 + bias
        want = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vv)
        torch.testing.assert_close(sdpa_packed(q, kk, vv, seqlens, kv), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_attention(q, kk, vv, seqlens, kv, "reference"), want, atol=1e-5, rtol=1e-5)


def test_key_valid_reference_path_equals_dropping_tokens():
    """The dense debug path (keep all, mask invalid keys) equals the packed path on the valid queries."""
    valid = make_valid([2, 1], 2, [0.4, 0.7])
    b, s = valid.shape
    q, k, v = torch.randn(3, 1, b * s, H, DH).unbind(0)
    dense = reference_attention(q, k, v, dense_mask([s] * b, [s] * b, valid.flatten()))
    idx = valid.flatten().nonzero().squeeze(1)
    seqlens = valid.sum(1).tolist()
    packed = packed_attention(q[:, idx], k[:, idx], v[:, idx], seqlens, seqlens, "sdpa")
    torch.testing.assert_close(packed, dense[:, idx], atol=1e-5, rtol=1e-5)


def test_cross_attention_packed_queries_see_own_text():
    seqlens, text_len = [7, 3, 5], 4
    q = torch.randn(1, sum(seqlens), H, DH)
    text_k, text_v = torch.randn(2, len(seqlens), text_len, H, DH).unbind(0)
    out = sdpa_packed(q, text_k.flatten(0, 1)[None], text_v.flatten(0, 1)[None], seqlens, [text_len] * 3)
    for b, (start, n) in enumerate(zip([0, 7, 10], seqlens)):
        want = torch.nn.functional.scaled_dot_product_attention(
            q[:, start : start + n].transpose(1, 2), text_k[b : b + 1].transpose(1, 2), text_v[b : b + 1].transpose(1, 2)
        ).transpose(1, 2)
        torch.testing.assert_close(out[:, start : start + n], want, atol=1e-5, rtol=1e-5)


def test_backend_selection_on_cpu(caplog):
    attention._resolved.clear()
    attention._logged.clear()
    with caplog.at_level(logging.INFO, logger="saber_pl.attention"):
        assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
        assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
        assert resolve_backend("sdpa", torch.device("cpu")) == "sdpa"
    assert sum("attention backend: sdpa (requested auto" in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match="attn_backend='xformers'"):
        resolve_backend("xformers", torch.device("cpu"))
    with pytest.raises(ValueError, match="attn_backend must be"):
        resolve_backend("flash", torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- varlen backend


def fake_varlen_attn(calls: list):
    """`varlen_attn` by its documented semantics (per-segment SDPA), checking the inputs the kernel needs.

    Segments come from the cumulative lengths only, so wrong cu_seq_q/cu_seq_k give wrong outputs; a max
    length below a segment's is an error (the CUDA kernel would skip its tail tokens).
    """

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs):
        assert not kwargs, kwargs
        assert query.ndim == key.ndim == value.ndim == 3 and query.stride(-1) == 1  # [T, H, Dh]
        assert cu_seq_q.dtype == cu_seq_k.dtype == torch.int32 and cu_seq_q.device == query.device
        assert cu_seq_q[0] == 0 and cu_seq_q[-1] == query.shape[0] and cu_seq_k[-1] == key.shape[0]
        q_lens, k_lens = cu_seq_q.diff().tolist(), cu_seq_k.diff().tolist()
        assert max_q == max(q_lens) and max_k == max(k_lens)
        calls.append((q_lens, k_lens))
        outs = [
            torch.nn.functional.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
            .transpose(0, 1)
            for qs, ks, vs in zip(query.split(q_lens), key.split(k_lens), value.split(k_lens))
        ]
        return torch.cat(outs)

    return varlen_attn


@pytest.fixture
def fake_varlen(monkeypatch):
    """Route `varlen_attn` to the reference and let resolve_backend accept varlen on the CPU."""
    import torch.nn.attention.varlen as varlen_mod

    calls: list = []
    monkeypatch.setattr(varlen_mod, "varlen_attn", fake_varlen_attn(calls))
    real = attention.unavailable
    monkeypatch.setattr(attention, "unavailable", lambda b, d, t: None if b == "varlen" else real(b, d, t))
    attention._resolved.clear()
    yield calls
    attention._resolved.clear()


@pytest.mark.parametrize("counts,kmax,keep", CASES)
def test_varlen_glue_equals_dense_forward_backward(fake_varlen, counts, kmax, keep):
    """cu_seqlens, max lengths and the [N, H, Dh] reshapes of the varlen path, self- and cross-attention."""
    seqlens = make_valid(counts, kmax, keep).sum(1).tolist()
    for kv in (seqlens, [5] * len(seqlens)):
        q = torch.randn(1, sum(seqlens), H, DH, requires_grad=True)
        k, v = (torch.randn(1, sum(kv), H, DH, requires_grad=True) for _ in range(2))
        grad = torch.randn(1, sum(seqlens), H, DH)
        want = reference_attention(q, k, v, dense_mask(seqlens, kv))
        want_grads = torch.autograd.grad(want, (q, k, v), grad)
        got = packed_attention(q, k, v, seqlens, kv, "varlen")
        got_grads = torch.autograd.grad(got, (q, k, v), grad)
        assert fake_varlen[-1] == (seqlens, kv)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_varlen_backend_in_the_model_equals_dense_reference(fake_varlen):
    """The whole tiny SaberTransformer on attn_backend=varlen equals its dense debug path (both attentions)."""
    from diffusers import WanTransformer3DModel

    from saber_pl.dit import SaberTransformer
    from saber_pl.wan import SCALES

    torch.manual_seed(0)
    dit = SCALES["tiny"]().dit
    model = SaberTransformer(WanTransformer3DModel(**dit), attn_backend="varlen")
    b, c, f, h, w = 2, dit["out_channels"], 2, 8, 8
    z, refs = torch.randn(b, c, f, h, w), torch.randn(b, 2, c, h, w)
    cov = (torch.rand(b, 2, 1, h, w) > 0.4).float()
    args = (z, torch.tensor([300.0, 700.0]), torch.randn(b, 4, dit["text_dim"]), refs, cov, torch.tensor([2, 1]))
    out = model(*args)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    assert len(fake_varlen) == 2 * dit["num_layers"]  # attn1 and attn2 of every block ran on varlen
    attention._resolved.clear()
    model.processor.backend = "sdpa"
    want = model(*args, dense_reference=True)
    want_grads = torch.autograd.grad(want.square().mean(), list(model.parameters()))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-4)


def test_cu_seqlens_are_the_packing_offsets():
    cu = attention.cu_seqlens((7, 3, 5), torch.device("cpu"))
    assert cu.dtype == torch.int32 and cu.tolist() == attention.Packing([7, 3, 5]).offsets == [0, 7, 10, 15]
    with torch.inference_mode():  # validation-made tensors are not reused for training (saved for backward)
        assert attention.cu_seqlens((7, 3, 5), torch.device("cpu")) is not cu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_backends_are_never_chosen_on_cpu(dtype):
    """auto is sdpa on the CPU; an explicit varlen/xformers there is an error naming why (no silent fallback)."""
    attention._resolved.clear()
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, dtype) == "sdpa"
    for name in ("varlen", "xformers"):
        with pytest.raises(ValueError, match=f"attn_backend='{name}' cannot run here: {name} is CUDA only"):
            resolve_backend(name, cpu, dtype)


def test_auto_prefers_varlen_then_xformers_then_sdpa(monkeypatch):
    """The order auto tries on CUDA, with the availability of each kernel simulated."""
    cuda = torch.device("cuda")
    for broken, want in [((), "varlen"), (("varlen",), "xformers"), (("varlen", "xformers"), "sdpa")]:
        monkeypatch.setattr(attention, "unavailable", lambda b, d, t, broken=broken: "no" if b in broken else None)
        attention._resolved.clear()
        assert resolve_backend("auto", cuda, torch.bfloat16) == want
    attention._resolved.clear()


def test_varlen_reports_why_it_cannot_run():
    attention.unavailable.cache_clear()
    assert "bf16/fp16" in attention.unavailable("varlen", torch.device("cuda"), torch.float32)
    assert "CUDA only" in attention.unavailable("varlen", torch.device("cpu"), torch.bfloat16)
    assert attention.unavailable("sdpa", torch.device("cpu"), torch.float32) is None


def test_model_config_accepts_varlen():
    from saber_pl.wan import ModelConfig

    assert ModelConfig(scale="tiny", attn_backend="varlen").attn_backend == "varlen"
    with pytest.raises(ValueError, match="'auto', 'varlen', 'xformers' or 'sdpa'"):
        ModelConfig(scale="tiny", attn_backend="flash")
