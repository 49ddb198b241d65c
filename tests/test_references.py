"""Reference preparation: segmenters, gray fill, aspect-preserving fit to the video, bad inputs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saber_pl.references import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AlphaSegmenter,
    AutoSegmenter,
    MaskFileSegmenter,
    Reference,
    ReferenceConfig,
    birefnet_postprocess,
    birefnet_preprocess,
    build_segmenter,
    fit_to_video,
    prepare_references,
    save_references,
)

RED = np.array([230, 20, 20], dtype=np.uint8)
GREEN = np.array([20, 230, 20], dtype=np.uint8)


def _rgba_subject(path: Path, w: int = 60, h: int = 40) -> Path:
    """Opaque red rectangle in the middle third; transparent green elsewhere (must not leak)."""
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[..., :3] = GREEN
    rgba[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3, :3] = RED
    rgba[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3, 3] = 255
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def _rgb(path: Path, w: int, h: int, colour: np.ndarray = GREEN) -> Path:
    Image.fromarray(np.broadcast_to(colour, (h, w, 3)).copy()).save(path)
    return path


def _mask_png(path: Path, w: int, h: int, box: tuple[int, int, int, int]) -> Path:
    m = np.zeros((h, w), dtype=np.uint8)
    top, left, bh, bw = box
    m[top : top + bh, left : left + bw] = 200
    Image.fromarray(m, "L").save(path)
    return path


def test_alpha_segmenter_gray_fill(tmp_path):
    path = _rgba_subject(tmp_path / "a.png")
    refs, masks = prepare_references([str(path)], ReferenceConfig(height=40, width=60))
    assert refs.shape == (1, 3, 40, 60) and masks.shape == (1, 1, 40, 60)
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert masks[0, 0, 13:26, 20:40].all() and masks.sum() == 13 * 20  # the alpha rectangle, same size
    outside = masks[0, 0] == 0
    assert (refs[0][:, outside] == 0).all()  # gray = 0 in [-1, 1]; the transparent green never shows
    inside = refs[0][:, ~outside]
    torch.testing.assert_close(inside.mean(1), torch.tensor(RED / 127.5 - 1, dtype=torch.float32), atol=1e-3, rtol=0)


def test_mask_file_segmenter_and_auto_prefers_it(tmp_path):
    img = _rgba_subject(tmp_path / "a.png")  # has alpha, but the mask file must win under `auto`
    mask = _mask_png(tmp_path / "m.png", 60, 40, (0, 0, 10, 30))
    ref = Reference(str(img), mask_path=str(mask))
    refs, masks = prepare_references([ref], ReferenceConfig(height=40, width=60))
    assert masks[0, 0, :10, :30].all() and masks.sum() == 10 * 30
    image = Image.open(img)
    assert isinstance(AutoSegmenter().choose(image, ref), MaskFileSegmenter)
    assert isinstance(AutoSegmenter().choose(image, Reference(str(img))), AlphaSegmenter)
    explicit = prepare_references([ref], ReferenceConfig(height=40, width=60, segmenter="mask_file"))
    torch.testing.assert_close(explicit[1], masks)


def test_aspect_preserving_resize_and_pad(tmp_path):
    """A 40x40 image into a 64x32 video: scaled to 32x32, centred, gray and mask 0 in the side bands."""
    img = _rgb(tmp_path / "sq.png", 40, 40, RED)
    mask = _mask_png(tmp_path / "m.png", 40, 40, (0, 0, 40, 40))
    refs, masks = prepare_references([Reference(str(img), mask_path=str(mask))], ReferenceConfig(height=32, width=64))
    assert refs.shape == (1, 3, 32, 64)
    pad = torch.ones(32, 64, dtype=torch.bool)
    pad[:, 16:48] = False
    assert (masks[0, 0][pad] == 0).all() and (refs[0][:, pad] == 0).all()
    assert (masks[0, 0][~pad] == 1).all()
    # a tall image into a wide video: bands left and right; a wide one into a tall video: bands top and bottom
    ref, m = fit_to_video(torch.rand(3, 40, 20), torch.ones(40, 20), 32, 64)
    assert m[0].sum(0).nonzero().flatten().tolist() == list(range(24, 40))  # width 16 = 20 * 32/40, centred
    ref, m = fit_to_video(torch.rand(3, 20, 40), torch.ones(20, 40), 64, 32)
    assert m[0].sum(1).nonzero().flatten().tolist() == list(range(24, 40))
    assert (ref[:, m[0] == 0] == 0).all()


def test_scene_kind_uses_whole_image(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (30, 60, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "scene.png")
    refs, masks = prepare_references([Reference(str(tmp_path / "scene.png"), kind="scene")],
                                     ReferenceConfig(height=30, width=60))
    assert (masks == 1).all()
    torch.testing.assert_close(refs[0], torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)


def test_birefnet_pre_and_post_processing():
    image = Image.fromarray(np.broadcast_to(RED, (30, 50, 3)).copy())
    x = birefnet_preprocess(image, size=64)
    assert x.shape == (1, 3, 64, 64)
    expected = (torch.tensor(RED / 255.0) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 10, 10], expected.float(), atol=1e-5, rtol=0)
    logits = torch.full((1, 1, 64, 64), -4.0)
    logits[..., :32] = 4.0  # left half foreground
    mask = birefnet_postprocess([torch.zeros(1, 1, 16, 16), logits], height=30, width=50)  # the LAST output counts
    assert mask.shape == (30, 50)
    assert (mask[:, :24] == 1).all() and (mask[:, 26:] == 0).all()
    assert birefnet_postprocess([logits - 8.0], 30, 50).sum() == 0  # sigmoid(-4) < 0.5 everywhere


def test_birefnet_segmenter_with_fake_model(tmp_path):
    """The network is replaced by a callable that marks red pixels: the plumbing around it is real."""
    img = np.broadcast_to(GREEN, (40, 60, 3)).copy()
    img[10:30, 5:25] = RED
    Image.fromarray(img).save(tmp_path / "r.jpg")
    calls = []

    def fake_model(x: torch.Tensor) -> list[torch.Tensor]:
        calls.append(tuple(x.shape))
        return [torch.zeros(1, 1, 8, 8), (x[:, :1] > 0).float() * 10 - 5]  # red channel above the ImageNet mean

    cfg = ReferenceConfig(height=40, width=60, segmenter="birefnet", birefnet_dir=str(tmp_path), birefnet_size=64)
    refs, masks = prepare_references([str(tmp_path / "r.jpg")], cfg, build_segmenter(cfg, birefnet_model=fake_model))
    assert calls == [(1, 3, 64, 64)]
    found = masks[0, 0].nonzero()
    assert abs(found[:, 0].min() - 10) <= 1 and abs(found[:, 0].max() - 29) <= 1
    assert abs(found[:, 1].min() - 5) <= 1 and abs(found[:, 1].max() - 24) <= 1


def test_save_references(tmp_path):
    refs, masks = fit_to_video(torch.ones(3, 8, 8), torch.ones(8, 8), 8, 16)
    written = save_references(refs[None], masks[None], tmp_path / "out" / "sample.mp4")
    assert [p.name for p in written] == ["sample_ref0.png", "sample_ref0_mask.png"]
    rgb = np.asarray(Image.open(written[0]))
    assert rgb.shape == (8, 16, 3) and (rgb[:, :4] == 128).all() and (rgb[:, 4:12] == 255).all()
    assert set(np.unique(np.asarray(Image.open(written[1]))).tolist()) == {0, 255}


# --- bad inputs -------------------------------------------------------------------------------------


def test_missing_and_unreadable_images(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        prepare_references([str(tmp_path / "nope.png")])
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="bad.png"):
        prepare_references([str(tmp_path / "bad.png")])
    img = _rgb(tmp_path / "ok.png", 10, 10)
    with pytest.raises(FileNotFoundError, match="nomask.png"):
        prepare_references([Reference(str(img), mask_path=str(tmp_path / "nomask.png"))])


def test_empty_segmentation(tmp_path):
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[0, 0, 3] = 255  # one opaque pixel out of 400: 0.25% < min_foreground 1%
    Image.fromarray(rgba, "RGBA").save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="empty segmentation for .*empty.png"):
        prepare_references([str(tmp_path / "empty.png")], ReferenceConfig(min_foreground=0.01))
    img = _rgb(tmp_path / "x.png", 20, 20)
    mask = _mask_png(tmp_path / "zero.png", 20, 20, (0, 0, 0, 0))
    with pytest.raises(ValueError, match="empty segmentation for .*x.png"):
        prepare_references([Reference(str(img), mask_path=str(mask))])


def test_too_many_unknown_kind_and_no_segmentation(tmp_path):
    img = _rgba_subject(tmp_path / "a.png")
    with pytest.raises(ValueError, match="3 references given, max_references is 2"):
        prepare_references([str(img)] * 3, ReferenceConfig(max_references=2))
    with pytest.raises(ValueError, match="unknown reference kind 'object'"):
        prepare_references([Reference(str(img), kind="object")])
    plain = _rgb(tmp_path / "plain.jpg", 20, 20)
    with pytest.raises(ValueError, match="no segmentation for subject reference .*plain.jpg.*birefnet_dir"):
        prepare_references([str(plain)])
    with pytest.raises(ValueError, match="alpha.*plain.jpg"):
        prepare_references([str(plain)], ReferenceConfig(segmenter="alpha"))


def test_errors_before_segmentation_model_runs(tmp_path):
    """A bad reference anywhere in the list fails before BiRefNet sees any image."""
    good = _rgb(tmp_path / "good.jpg", 20, 20)
    calls = []

    def fake_model(x):
        calls.append(1)
        return [torch.ones(1, 1, 8, 8)]

    cfg = ReferenceConfig(segmenter="birefnet", birefnet_dir=str(tmp_path), birefnet_size=32)
    seg = build_segmenter(cfg, birefnet_model=fake_model)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        prepare_references([str(good), str(tmp_path / "missing.jpg")], cfg, seg)
    with pytest.raises(ValueError, match="unknown reference kind"):
        prepare_references([str(good), Reference(str(good), kind="bg")], cfg, seg)
    assert calls == []
    with pytest.raises(FileNotFoundError, match="BiRefNet folder not found: .*no_weights"):
        prepare_references([str(good)], ReferenceConfig(birefnet_dir=str(tmp_path / "no_weights")))


def test_config_validation_names_field():
    with pytest.raises(ValueError, match="segmenter"):
        ReferenceConfig(segmenter="sam")
    with pytest.raises(ValueError, match="birefnet_dir"):
        ReferenceConfig(segmenter="birefnet")
    with pytest.raises(ValueError, match="max_references"):
        ReferenceConfig(max_references=0)


def test_subject_size_shows_the_subject_box_at_that_fraction_of_the_frame_centred(tmp_path):
    """A subject filling a small corner of a big photo comes out with its box at subject_size x min(H, W),
    centred, its colour kept, gray elsewhere; the paper's fit (None) shows it where and as large as the photo does."""
    rgba = np.zeros((100, 100, 4), dtype=np.uint8)
    rgba[5:25, 10:20, :3], rgba[5:25, 10:20, 3] = RED, 255  # a 20 x 10 subject in the top-left corner
    path = tmp_path / "corner.png"
    Image.fromarray(rgba, "RGBA").save(path)
    refs, masks = prepare_references([str(path)], ReferenceConfig(height=40, width=60, subject_size=0.5))
    ys, xs = torch.nonzero(masks[0, 0] > 0.5, as_tuple=True)
    assert int(ys.max() - ys.min()) + 1 == 20 and int(xs.max() - xs.min()) + 1 == 10  # 0.5 x 40 tall, aspect kept
    assert abs(float(ys.float().mean()) - 19.5) <= 0.5 and abs(float(xs.float().mean()) - 29.5) <= 0.5  # centred
    assert (refs[0][:, masks[0, 0] == 0] == 0).all()
    torch.testing.assert_close(refs[0][:, masks[0, 0] > 0].mean(1), torch.tensor(RED / 127.5 - 1, dtype=torch.float32),
                               atol=1e-3, rtol=0)
    fit_refs, fit_masks = prepare_references([str(path)], ReferenceConfig(height=40, width=60))
    fy, fx = torch.nonzero(fit_masks[0, 0] > 0.5, as_tuple=True)
    assert int(fy.max() - fy.min()) + 1 == 8 and float(fy.float().mean()) < 10  # 20 px of 100 -> 8 of 40, top-left
    scene = prepare_references([Reference(str(path), kind="scene")], ReferenceConfig(height=40, width=60,
                                                                                     subject_size=0.5))[1]
    assert scene[0, 0, :, 10:50].all()  # a scene reference is used whole whatever subject_size says


@pytest.mark.parametrize("size", [0.0, -0.2, 1.5])
def test_subject_size_outside_0_1_is_refused(size):
    with pytest.raises(ValueError, match="subject_size must be in"):
        ReferenceConfig(subject_size=size)
