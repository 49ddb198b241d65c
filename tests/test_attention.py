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
