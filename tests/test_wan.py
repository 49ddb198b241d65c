"""Scale registry, parameter counts, VAE and text-encoder wrappers, loading from a local Wan folder."""

import pytest
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from saber_pl.dit import drop_image_branch
from saber_pl.wan import (
    SCALES, ModelConfig, PixelAutoencoder, VideoVAE, build_components, meta_transformer, meta_wan, num_params,
    random_wan, rebuild_rope, spectral_basis,
)


@pytest.mark.parametrize(
    "field,value", [("scale", "7B"), ("init", "v2v"), ("ref_timestep", "one"), ("attn_backend", "flash"),
                    ("valid_threshold", 0.0), ("mask_threshold", 1.5), ("max_refs", 0), ("text_len", 0),
                    ("ref_rope_offset", -1), ("prediction", "epsilon"), ("prediction_t_min", 0.0),
                    ("position_embedding", "learned")]
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{"scale": "tiny", field: value})


def test_sample_prediction_refuses_pretrained_velocity_weights():
    with pytest.raises(ValueError, match="prediction=sample needs init=random"):
        ModelConfig(scale="14B", init="t2v", prediction="sample")
    assert ModelConfig(scale="14B", init="random", prediction="sample").prediction == "sample"


def test_position_embedding_refuses_pretrained_weights():
    """Wan's pretrained DiT never saw absolute positions: adding them would corrupt its features."""
    with pytest.raises(ValueError, match="position_embedding needs init=random"):
        ModelConfig(scale="14B", init="t2v", position_embedding="sincos")
    assert ModelConfig(scale="mini", init="random", position_embedding="sincos").position_embedding == "sincos"


def test_meta_parameter_counts_match_diffusers():
    assert num_params(meta_wan("14B")) == 14_288_491_584
    assert num_params(meta_wan("1.3B")) == 1_418_996_800
    assert num_params(meta_wan("14B", in_channels=36)) == 14_288_901_184
    assert num_params(meta_transformer(ModelConfig(scale="14B", init="t2v"))) == 14_288_901_184
    i2v = meta_wan("14B", i2v=True)
    assert num_params(i2v) == 16_394_878_784
    drop_image_branch(i2v)
    assert num_params(i2v) == 14_288_901_184
    assert num_params(meta_transformer(ModelConfig(scale="14B", init="i2v"))) == 14_288_901_184


def test_meta_model_materialised_with_weights_and_rope_computes_the_same():
    cfg = ModelConfig(scale="tiny")
    model = build_components(cfg).transformer
    empty = meta_transformer(cfg).to_empty(device="cpu")
    empty.load_state_dict(model.state_dict())
    rebuild_rope(empty)
    z, t, text = torch.randn(1, 16, 2, 8, 8), torch.tensor([300.0]), torch.randn(1, 4, 32)
    torch.testing.assert_close(empty(z, t, text), model(z, t, text), atol=0, rtol=0)


def test_tiny_components_end_to_end():
    comps = build_components(ModelConfig(scale="tiny"))
    vae, text = comps.vae, comps.text_encoder
    assert isinstance(vae.model, AutoencoderKLWan) and (vae.spatial_factor, vae.temporal_factor) == (8, 4)
    video = torch.rand(2, 3, 5, 32, 32) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 16, 2, 4, 4)
    raw = vae.model.encode(video).latent_dist.mode()  # Wan pipeline normalisation: (z - mean) / std
    mean = torch.tensor(vae.model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.model.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(z, (raw - mean) / std)
    assert vae.decode(z).shape == video.shape
    ref = vae.encode(video[:, :, :1])  # a reference image is a one-frame video
    assert ref.shape == (2, 16, 1, 4, 4)
    ids, mask = text.tokenize(["a red fox", "a cat"])
    out = comps.transformer(z, torch.tensor([10.0, 900.0]), text.encode(ids, mask), ref[:, None, :, 0],
                            torch.ones(2, 1, 1, 4, 4), torch.tensor([1, 0]))
    assert out.shape == z.shape
    assert not any(p.requires_grad for p in vae.parameters()) and not any(p.requires_grad for p in text.parameters())
    vae.train(), text.train()
    assert not vae.model.training and not text.encoder.training


def test_vae_rejects_frame_counts_it_would_cut():
    vae = build_components(ModelConfig(scale="tiny")).vae
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.zeros(1, 3, 6, 32, 32))  # the Wan VAE would silently drop a frame
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 5, 36, 32))


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_pixel_autoencoder_round_trip_is_exact(frames):
    vae = VideoVAE(PixelAutoencoder(2), [0.0] * 48, [1.0] * 48)
    video = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    z = vae.encode(video)
    assert z.shape == (2, 48, 1 + (frames - 1) // 4, 8, 12) and vae.latent_channels == 48
    assert torch.equal(vae.decode(z), video)
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        vae.encode(torch.cat([video, video], dim=2))  # 2, 10, 18 frames


def test_mini_scale_uses_a_16_channel_spectral_autoencoder():
    comps = build_components(ModelConfig(scale="mini"))
    assert isinstance(comps.vae.model, PixelAutoencoder)
    assert comps.transformer.latent_channels == comps.vae.latent_channels == 16
    assert comps.transformer.wan.config.in_channels == 16 + 4 + 16  # Wan's T2V-widened layout
    assert comps.text_encoder.text_len == SCALES["mini"]().text_len


def test_spectral_basis_is_orthonormal_and_ordered_like_the_pixel_channels():
    basis = spectral_basis(4, 2)  # [48, 48]
    torch.testing.assert_close(basis @ basis.T, torch.eye(48), atol=1e-6, rtol=0)
    # component (luma, temporal DC, spatial DC) is the block mean (times sqrt(48)): flat grey in, only it out
    video = torch.full((1, 3, 5, 4, 4), 0.25)
    z = PixelAutoencoder(2, 4, [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 3)]).encode(video)  # [1, 4, 2, 2, 2]
    torch.testing.assert_close(z[:, 0], torch.full_like(z[:, 0], 0.25 * 48**0.5))
    torch.testing.assert_close(z[:, 1:], torch.zeros_like(z[:, 1:]), atol=1e-6, rtol=0)


def test_spectral_autoencoder_is_the_projection_onto_its_components():
    torch.manual_seed(0)
    video = torch.rand(2, 3, 9, 8, 8) * 1.6 - 0.8  # inside [-1, 1]: no clamping in decode
    full = PixelAutoencoder(2, 4, [(c, k, j) for c in range(3) for k in range(4) for j in range(4)])
    torch.testing.assert_close(full.decode(full.encode(video)), video, atol=1e-5, rtol=0)  # all 48: invertible
    kept = [(0, 0, 0), (2, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]
    ae = PixelAutoencoder(2, 4, kept)
    z = ae.encode(video)
    assert z.shape == (2, 5, 3, 4, 4)
    rec = ae.decode(z)
    torch.testing.assert_close(ae.encode(rec), z, atol=1e-5, rtol=0)  # a projection: idempotent
    # plain reference: the same projection as least squares on the raw 48 channels
    raw = PixelAutoencoder(2, 4).encode(video)  # [2, 48, 3, 4, 4]
    rows = spectral_basis(4, 2)[[(c * 4 + k) * 4 + j for c, k, j in kept]]  # [5, 48]
    want = torch.einsum("ck,cl,blnhw->bknhw", rows, rows, raw)
    torch.testing.assert_close(PixelAutoencoder(2, 4).encode(rec)[:, :, 1:], want[:, :, 1:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("components,match", [([(3, 0, 0)], "out of range"), ([(0, 0, 0), (0, 0, 0)], "distinct")])
def test_spectral_autoencoder_rejects_bad_components(components, match):
    with pytest.raises(ValueError, match=match):
        PixelAutoencoder(2, 4, components)


def test_text_encoder_zero_pads_like_wan_pipeline():
    text = build_components(ModelConfig(scale="tiny", text_len=12)).text_encoder
    captions = ["hi", "a much longer caption than twelve bytes"]
    ids, mask = text.tokenize(captions)
    assert ids.shape == mask.shape == (2, 12)
    emb = text.encode(ids, mask)
    raw = text.encoder(ids, mask).last_hidden_state  # WanPipeline._get_t5_prompt_embeds, line by line
    lens = mask.gt(0).sum(dim=1).long()
    want = torch.stack([torch.cat([u[:v], u.new_zeros(12 - v, u.size(1))]) for u, v in zip(raw, lens)])
    assert torch.equal(emb, want)
    assert lens[0] == 3 and not emb[0, 3:].any() and emb[0, :3].abs().sum() > 0


def write_wan_folder(root):
    """A tiny Wan2.1-style diffusers folder: transformer/, vae/, text_encoder/, tokenizer/."""
    dit = SCALES["tiny"]().dit
    WanTransformer3DModel(**dit).save_pretrained(root / "transformer")
    AutoencoderKLWan(**SCALES["tiny"]().vae).save_pretrained(root / "vae")
    UMT5EncoderModel(UMT5Config(**SCALES["tiny"]().umt5)).save_pretrained(root / "text_encoder")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "runs": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(
        root / "tokenizer"
    )


def test_loading_from_local_wan_dir(tmp_path, monkeypatch):
    write_wan_folder(tmp_path)
    comps = build_components(ModelConfig(scale="1.3B", wan_dir=str(tmp_path), text_len=8))
    saved = WanTransformer3DModel.from_pretrained(tmp_path / "transformer").patch_embedding.weight
    loaded = comps.transformer.wan.patch_embedding.weight
    assert torch.equal(loaded[:, :16], saved) and not loaded[:, 16:].any()
    ids, mask = comps.text_encoder.tokenize(["a cat runs"])
    assert comps.text_encoder.encode(ids, mask).shape == (1, 8, 32)
    assert comps.vae.encode(torch.zeros(1, 3, 1, 16, 16)).shape == (1, 16, 1, 2, 2)

    monkeypatch.setenv("WAN_DIR", str(tmp_path))  # $WAN_DIR stands in for wan_dir
    assert build_components(ModelConfig(scale="1.3B", text_len=8)).transformer.latent_channels == 16
    with pytest.raises(ValueError, match="init='i2v'"):
        build_components(ModelConfig(scale="1.3B", init="i2v"))


def test_missing_wan_dir_is_reported(tmp_path, monkeypatch):
    monkeypatch.delenv("WAN_DIR", raising=False)
    with pytest.raises(ValueError, match="wan_dir.*WAN_DIR"):
        build_components(ModelConfig(scale="14B"))
    (tmp_path / "vae").mkdir()
    with pytest.raises(ValueError, match="wan_dir.*lacks.*transformer"):
        build_components(ModelConfig(scale="14B", wan_dir=str(tmp_path)))


def test_adaln_zero_starts_every_block_as_identity_and_trains():
    """DiT's init for from-scratch weights (mini): v = 0 at step 0, blocks identity, one AdamW step moves v."""
    torch.manual_seed(0)
    wan = random_wan(SCALES["tiny"]().dit, "random", "adaln_zero")
    x = torch.randn(2, 36, 2, 8, 8)
    t = torch.tensor([300.0, 800.0])
    text = torch.randn(2, 16, 32)
    assert wan(x, t, text, return_dict=False)[0].abs().max() == 0  # proj_out and gates at zero
    opt = torch.optim.AdamW(wan.parameters(), lr=1e-3)
    target = torch.randn(2, 16, 2, 8, 8)
    for _ in range(3):
        loss = (wan(x, t, text, return_dict=False)[0] - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = wan(x, t, text, return_dict=False)[0]
    assert out.abs().mean() > 1e-3 and (out - target).pow(2).mean() < loss  # it learns from zero
    default = random_wan(SCALES["tiny"]().dit, "random")
    assert default.proj_out.weight.abs().sum() > 0  # the layers' own init stays the default
    with pytest.raises(ValueError, match="random_weights"):
        ModelConfig(scale="tiny", random_weights="zeros")


def test_adaln_zero_blocks_are_identity_at_init():
    torch.manual_seed(0)
    wan = random_wan(SCALES["tiny"]().dit, "random", "adaln_zero")
    seen = []
    wan.blocks[0].register_forward_hook(lambda m, inp, out: seen.append((inp[0].clone(), out.clone())))
    wan(torch.randn(1, 36, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 16, 32), return_dict=False)
    block_in, block_out = seen[0]
    assert torch.equal(block_in, block_out)


def _spectral_stats_of_training_clips(n: int) -> tuple[list[tuple[int, int, int]], torch.Tensor, torch.Tensor]:
    """Every (colour, temporal, spatial) component's std and mean on n embedded-set clips as training sees
    them (rendered, written as mp4, decoded at the mini size)  # -> names [48], std [48], mean [48]."""
    from saber_pl.config import load_config
    from saber_pl.synthetic import SyntheticConfig, clip_seed, render_clip, sample_clip_spec
    from saber_pl.video import decode_clip, encode_mp4

    d = load_config("t2v_baseline", "mini").data
    clips = []
    for i in range(n):
        spec = sample_clip_spec(clip_seed(0, "train", i), SyntheticConfig())
        mp4 = encode_mp4(render_clip(spec), spec.cfg.fps, crf=spec.cfg.crf)
        clips.append(decode_clip(mp4, d.num_frames, d.fps, d.height, d.width, start=0).float() / 127.5 - 1.0)
    video = torch.stack(clips).permute(0, 2, 1, 3, 4)  # [N, 3, F, H, W]
    names = [(c, k, j) for c in range(3) for k in range(4) for j in range(4)]
    z = PixelAutoencoder(2, 4, names).encode(video)  # [N, 48, f, h, w]
    return names, z.std(dim=(0, 2, 3, 4)), z.mean(dim=(0, 2, 3, 4))


def test_mini_autoencoder_keeps_the_components_of_largest_variance_and_centres_them():
    """MINI_AUTOENCODER is fitted to the embedded set: its 16 components are the ones of largest variance
    there (no channel the data leaves empty, which the DiT could only fill with noise) and its mean centres
    each kept channel. The list before the refit kept two colour details of std 0.005 (vs 0.12 for the best
    dropped one) and left the luma DC at a normalised mean of -4.4."""
    from saber_pl.wan import MINI_AUTOENCODER

    names, std, mean = _spectral_stats_of_training_clips(48)
    kept = [names.index(c) for c in MINI_AUTOENCODER["components"]]
    dropped = [i for i in range(48) if i not in kept]
    assert std[kept].min() > 0.8 * std[dropped].max()  # the top 16, up to sampling noise at the boundary
    assert std[kept].min() > 0.05 * std[kept].max()
    norm_mean = (mean[kept] - torch.tensor(MINI_AUTOENCODER["latents_mean"])) / torch.tensor(MINI_AUTOENCODER["latents_std"])
    assert norm_mean.abs().max() < 0.5  # in units of the shared std; the luma DC's own std is ~3
    rms = std[kept].pow(2).mean().sqrt()
    assert abs(rms / MINI_AUTOENCODER["latents_std"][0] - 1) < 0.15  # one shared std: the RMS of the kept stds
