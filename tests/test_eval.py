"""OpenS2V-Eval harness (case files, resumable generation, Total) and the built-in metrics."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from saber_pl.eval.metrics import (
    MetricsConfig,
    consistency_matrix,
    copy_paste_score,
    direction_from_track,
    evaluate_video,
    identity_retrieval_accuracy,
    load_feature_model,
    prompt_direction,
    read_video,
    reference_consistency,
    temporal_smoothness,
    text_following,
    track_centroids,
)
from saber_pl.eval.opens2v import (
    aggregate,
    aggregate_folder,
    domain_weights,
    generate_cases,
    load_cases,
    load_raw_scores,
    main,
    markdown_table,
    video_is_readable,
)

# --- OpenS2V harness --------------------------------------------------------------------------------

CASES = {
    "singleobj_1": {"img_paths": ["Images/singleobject/cup/52.jpg"], "prompt": "A cup on a table.",
                    "synthesis_flag": "wrong", "class_label": ["Cup"]},
    "multiface_1": {"img_paths": ["Images/multiface/crop_woman/1.jpg", "Images/multiface/scene/1.jpg"],
                    "prompt": "A woman in a bedroom.", "synthesis_flag": "True", "class_label": ["Woman", "Bedroom"]},
    "humanobj_2": {"img_paths": ["Images/humanobj/human/man/1.jpg", "Images/humanobj/environment/park/1.jpg"],
                   "prompt": "A man walks in a park.", "synthesis_flag": "Wrong", "class_label": ["Man", "Park"]},
}


def _write_mp4(path: str, frames: np.ndarray, fps: int = 8) -> None:
    """uint8 [F, H, W, 3] -> h264 mp4."""
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture
def opens2v_root(tmp_path: Path) -> Path:
    root = tmp_path / "OpenS2V-Eval"
    for case in CASES.values():
        for rel in case["img_paths"]:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / rel)
    (root / "Open-Domain_Eval.json").write_text(json.dumps(CASES, indent=4))
    return root


class FakeGenerator:
    """Records calls and writes a tiny video whose content depends on the seed and prompt."""

    def __init__(self, fail: set[str] = frozenset()) -> None:
        self.calls: list[tuple[str, list[str], str, int]] = []
        self.fail = fail

    def __call__(self, prompt: str, ref_paths: list[str], out_path: str, seed: int) -> None:
        self.calls.append((prompt, ref_paths, out_path, seed))
        if Path(out_path).stem in self.fail:
            Path(out_path).write_bytes(b"half a video")  # a crash mid-write
            raise RuntimeError("out of memory")
        value = (seed + len(prompt)) % 256
        _write_mp4(out_path, np.full((3, 16, 16, 3), value, np.uint8))


def test_load_cases(opens2v_root):
    cases = load_cases(opens2v_root, "Open-Domain")
    assert [c.case_id for c in cases] == list(CASES)
    assert cases[1].img_paths == [str(opens2v_root / p) for p in CASES["multiface_1"]["img_paths"]]
    assert cases[1].ref_kinds == ["subject", "scene"] and cases[2].ref_kinds == ["subject", "scene"]
    assert cases[0].class_labels == ["Cup"] and cases[0].prompt == "A cup on a table."
    with pytest.raises(FileNotFoundError, match="Human-Domain_Eval.json"):
        load_cases(opens2v_root, "Human-Domain")
    (opens2v_root / "Images/multiface/scene/1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="multiface_1.*scene/1.jpg"):
        load_cases(opens2v_root, "Open-Domain")
    with pytest.raises(ValueError, match="domain"):
        load_cases(opens2v_root, "Open")


def test_generation_layout_and_resume(opens2v_root, tmp_path):
    cases = load_cases(opens2v_root, "Open-Domain")
    out = tmp_path / "videos"
    gen = FakeGenerator()
    summary = generate_cases(cases, out, gen, seed=7, progress=False)
    assert sorted(summary.done) == sorted(CASES) and not summary.skipped and not summary.failed
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{k}.mp4" for k in CASES)
    prompt, refs, path, seed = gen.calls[1]
    assert (prompt, refs, path, seed) == (CASES["multiface_1"]["prompt"], cases[1].img_paths,
                                         str(out / "multiface_1.mp4"), 7)
    assert read_video(out / "singleobj_1.mp4").shape == (3, 3, 16, 16)

    again = FakeGenerator()
    summary = generate_cases(cases, out, again, seed=7, progress=False)
    assert sorted(summary.skipped) == sorted(CASES) and again.calls == []

    (out / "multiface_1.mp4").write_bytes(b"truncated")  # a crashed earlier run
    (out / "humanobj_2.mp4").unlink()
    third = FakeGenerator()
    summary = generate_cases(cases, out, third, seed=7, progress=False)
    assert summary.skipped == ["singleobj_1"] and sorted(summary.done) == ["humanobj_2", "multiface_1"]
    assert video_is_readable(out / "multiface_1.mp4")
    assert "done 2, skipped 1, failed 0" in str(summary)


def test_generation_failures(opens2v_root, tmp_path):
    cases = load_cases(opens2v_root, "Open-Domain")
    out = tmp_path / "videos"
    summary = generate_cases(cases, out, FakeGenerator(fail={"multiface_1"}), progress=False)
    assert list(summary.failed) == ["multiface_1"] and "out of memory" in summary.failed["multiface_1"]
    assert sorted(summary.done) == ["humanobj_2", "singleobj_1"]
    assert not (out / "multiface_1.mp4").exists()  # no half-written file is left for the scorers
    with pytest.raises(RuntimeError, match="out of memory"):
        generate_cases(cases, tmp_path / "v2", FakeGenerator(fail={"singleobj_1"}), fail_fast=True, progress=False)


def _write_raw(folder: Path, natural_error: bool = False) -> None:
    """Raw per-video outputs in the formats the benchmark's get_*.py scripts write."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "aesthetic_score.json": {"a": {"aes_score": 3.0}, "b": {"aes_score": 5.5}, "c": {"aes_score": 8.0}},
        "motion_smoothness.json": {"a": {"motion_smoothness": 0.8}, "b": {"motion_smoothness": 1.4},
                                   "c": {"motion_smoothness": -0.5}},
        "motion_amplitude.json": {"a": {"motion_fb": 0.2, "motion_lk": 7.2}, "b": {"motion_fb": 0.4, "motion_lk": 1.0},
                                  "c": {"motion_fb": 3.0, "motion_lk": 9.9}},
        "facesim.json": {"a": {"cur_score": 0.6, "arc_score": 0.1}, "b": {"cur_score": 1.3, "arc_score": 0.2}},
        "gmescore.json": {"a": {"gme_score": 0.7}, "b": {"gme_score": 0.65}, "c": {"gme_score": 0.75}},
        "nexusscore.json": {"a": {"nexus_score": 0}, "b": {"nexus_score": 0.02}, "c": {"nexus_score": 0.08}},
        "naturalscore_1.json": {"a": "4", "b": "2", "c": "5"},
        "naturalscore_2.json": {"a": "5", "b": "2", "c": "5"},
        "naturalscore_3.json": {"a": "3", "b": "error" if natural_error else "2"},  # c missing: mean of two
    }
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data, indent=4))


# hand-computed: clip per video, mean, scale
AES = ((4.0 + 5.5 + 7.0) / 3 - 4) / 3  # 0.5
SMOOTH = (0.8 + 1.0 + 0.5) / 3
AMP = (0.2 + 0.4 + 1.0) / 3
FACE = (0.6 + 1.0) / 2
GME = (0.7 + 0.65 + 0.75) / 3
NEXUS = (0.02 + 0.05) / 2 / 0.05  # the zero is left out
NATURAL = ((4 + 2 + 5) / 3 - 1) / 4


def test_total_open_and_human_domain(tmp_path):
    _write_raw(tmp_path / "raw")
    (tmp_path / "raw" / "Open-Domain.json").write_text("{}")  # other JSON files in the folder are ignored
    open_result = aggregate_folder(tmp_path / "raw", "Open-Domain")
    expected = {"aes_score": AES, "motion_smoothness": SMOOTH, "motion_amplitude": AMP, "facesim_cur": FACE,
                "gme_score": GME, "nexus_score": NEXUS, "natural_score": NATURAL}
    for key, value in expected.items():
        assert open_result[key] == pytest.approx(value, abs=1e-12), key
    total = 0.16 * AES + 0.06 * SMOOTH + 0.02 * AMP + 0.20 * FACE + 0.12 * GME + 0.20 * NEXUS + 0.24 * NATURAL
    assert open_result["total_score"] == pytest.approx(total, abs=1e-12)

    human = aggregate_folder(tmp_path / "raw", "Human-Domain")
    assert "nexus_score" not in human
    total = 0.18 * AES + 0.09 * SMOOTH + 0.03 * AMP + 0.25 * FACE + 0.15 * GME + 0.30 * NATURAL
    assert human["total_score"] == pytest.approx(total, abs=1e-12)
    assert aggregate_folder(tmp_path / "raw", "Single-Domain") == open_result  # merge_result.py: not Human = Open
    assert sum(domain_weights("Open-Domain").values()) == pytest.approx(1.0)
    assert sum(domain_weights("Human-Domain").values()) == pytest.approx(1.0)


def test_total_edge_cases(tmp_path):
    # a perfect video everywhere scores 1 per term and Total 1
    raw = {"aes_score": {"a": 9.0}, "motion_smoothness": {"a": 1.0}, "motion_amplitude": {"a": -2.0},
           "facesim_cur": {"a": 1.0}, "gme_score": {"a": 1.5}, "nexus_score": {"a": 0.3}, "natural_score": {"a": 5.0}}
    assert aggregate(raw, "Open-Domain")["total_score"] == pytest.approx(1.0)
    raw["nexus_score"] = {"a": 0.0}  # only zeros: NexusScore averages to 0, like merge_result.py
    assert aggregate(raw, "Open-Domain")["nexus_score"] == 0.0
    _write_raw(tmp_path / "bad", natural_error=True)
    with pytest.raises(ValueError, match="naturalscore_3.json.*entry b.*'error'"):
        load_raw_scores(tmp_path / "bad", "Open-Domain")
    _write_raw(tmp_path / "missing")
    (tmp_path / "missing" / "nexusscore.json").unlink()
    with pytest.raises(FileNotFoundError, match="nexusscore.json"):
        aggregate_folder(tmp_path / "missing", "Open-Domain")
    assert "nexus_score" not in aggregate_folder(tmp_path / "missing", "Human-Domain")  # Human needs no Nexus


def test_total_matches_official_merge_on_demo_files(tmp_path):
    """The benchmark's demo raw outputs (eval/demo_result/model_name_output_json, v1.1) and what its
    merge_result.py prints for them (run once on those files, for both weightings)."""
    demo = {
        "aesthetic_score.json": {"faceobj_14": {"aes_score": 4.811809062957764},
                                 "singleface_3": {"aes_score": 5.194509506225586}},
        "facesim.json": {"singleface_3": {"cur_score": 0.9420197624713182, "arc_score": 0.9367029462009668}},
        "gmescore.json": {"faceobj_14": {"gme_score": 0.68115234375}, "singleface_3": {"gme_score": 0.67236328125}},
        "motion_amplitude.json": {"faceobj_14": {"motion_fb": 0.35025984048843384, "motion_lk": 7.20788094284188},
                                  "singleface_3": {"motion_fb": 0.038793787360191345, "motion_lk": 0.7310104500534188}},
        "motion_smoothness.json": {"faceobj_14": {"motion_smoothness": 0.8985507246376812},
                                   "singleface_3": {"motion_smoothness": 1.0}},
        "naturalscore_1.json": {"faceobj_14": "4", "singleface_3": "3"},
        "naturalscore_2.json": {"faceobj_14": "4", "singleface_3": "3"},
        "naturalscore_3.json": {"faceobj_14": "4", "singleface_3": "4"},
        "nexusscore.json": {"faceobj_14": {"nexus_score": 0.01300811767578125}},
    }
    for name, data in demo.items():
        (tmp_path / name).write_text(json.dumps(data))
    official = {"total_score": 0.5959962472265614, "aes_score": 0.3343864281972249,
                "motion_smoothness": 0.9492753623188406, "motion_amplitude": 0.1945268139243126,
                "facesim_cur": 0.9420197624713182, "gme_score": 0.6767578125, "nexus_score": 0.260162353515625,
                "natural_score": 0.6666666666666667}
    assert aggregate_folder(tmp_path, "Open-Domain") == pytest.approx(official, abs=1e-12)
    assert aggregate_folder(tmp_path, "Human-Domain")["total_score"] == pytest.approx(0.6884787565947551, abs=1e-12)


def test_markdown_table_and_cli(tmp_path, capsys):
    _write_raw(tmp_path / "raw")
    result = aggregate_folder(tmp_path / "raw", "Open-Domain")
    table = markdown_table(result, "Open-Domain", name="ours")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0].split(" | ")[1:3] == ["Total", "Aesthetics"]
    assert "| Saber (paper) | 57.91 | — | — | — | 49.89 | — | 47.22 | 72.55 |" in rows
    assert rows[-1] == "| ours | " + " | ".join(f"{100 * result[k]:.2f}" for k in
                                               ["total_score", "aes_score", "motion_smoothness", "motion_amplitude",
                                                "facesim_cur", "gme_score", "nexus_score", "natural_score"]) + " |"
    human = markdown_table(aggregate_folder(tmp_path / "raw", "Human-Domain"), "Human-Domain")
    assert "NexusScore" not in human and "Kling" not in human
    main(["aggregate", "--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "o.json"),
          "--table", str(tmp_path / "t.md")])
    assert json.loads((tmp_path / "o.json").read_text()) == pytest.approx(result)
    assert (tmp_path / "t.md").read_text() in capsys.readouterr().out


# --- built-in metrics -------------------------------------------------------------------------------

H, W, FRAMES = 48, 72, 6


def _background() -> torch.Tensor:
    """A smooth colour gradient in [-1, 1]: [3, H, W]."""
    y = torch.linspace(-0.3, 0.3, H)[:, None].expand(H, W)
    x = torch.linspace(-0.2, 0.2, W)[None, :].expand(H, W)
    return torch.stack([y + x, 0.5 * y - x, -y])


def _pattern(c1: list[float], c2: list[float], kind: str, n: int = 12) -> torch.Tensor:
    """A textured n x n subject of two colours: stripes, checker or dots. [3, n, n] in [-1, 1]."""
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    sel = {"stripes": (yy // 2) % 2 == 0, "checker": ((yy // 2) + (xx // 2)) % 2 == 0,
           "dots": (yy % 3 == 1) & (xx % 3 == 1)}[kind]
    return torch.where(sel, torch.tensor(c1)[:, None, None], torch.tensor(c2)[:, None, None])


SUBJECTS = [
    _pattern([0.9, 0.9, -0.8], [0.9, -0.8, -0.8], "stripes"),  # yellow / red
    _pattern([-0.8, -0.8, 0.9], [-0.8, 0.9, 0.9], "checker"),  # blue / cyan
    _pattern([0.2, 0.9, 0.1], [0.95, 0.95, 0.95], "dots"),  # green on white
    _pattern([0.5, -0.7, 0.6], [-0.9, -0.9, -0.9], "stripes"),  # magenta / black
]


def _reference(patch: torch.Tensor, top: int = 4, left: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared-reference format: subject on gray (0) at the video size, and its mask."""
    ref, mask = torch.zeros(3, H, W), torch.zeros(1, H, W)
    n = patch.shape[-1]
    ref[:, top : top + n, left : left + n] = patch
    mask[:, top : top + n, left : left + n] = 1
    return ref, mask


def _video(patch: torch.Tensor, top: int, left: int, scale: float = 1.0, dx: int = 0, dy: int = 0,
           noise: float = 0.02) -> torch.Tensor:
    """The subject pasted (rescaled, optionally moving) on the gradient: float [F, 3, H, W] in [-1, 1]."""
    n = round(patch.shape[-1] * scale)
    p = F.interpolate(patch[None], size=(n, n), mode="nearest")[0]
    g = torch.Generator().manual_seed(0)
    frames = []
    for f in range(FRAMES):
        frame = _background() + noise * torch.randn(3, H, W, generator=g)
        t, l = top + f * dy, left + f * dx
        frame[:, t : t + n, l : l + n] = p
        frames.append(frame)
    return torch.stack(frames).clamp(-1, 1)


@pytest.mark.parametrize("feature", ["histogram", "pixels"])
def test_identity_retrieval_picks_own_reference(feature):
    """Each video holds its subject shifted and scaled x1.5; the other three references are distractors."""
    refs, masks = map(torch.stack, zip(*[_reference(s) for s in SUBJECTS]))  # [4, 3, H, W], [4, 1, H, W]
    videos = [_video(s, top=20, left=30 + 5 * i, scale=1.5) for i, s in enumerate(SUBJECTS)]
    cfg = MetricsConfig(feature=feature, window_scales=(1.0, 1.5, 2.0))
    scores = consistency_matrix(videos, refs, masks, cfg)  # [V, N]
    assert (scores.argmax(1) == torch.arange(4)).all()
    assert identity_retrieval_accuracy(videos[:1], refs, masks, [0], cfg) == 1.0
    assert identity_retrieval_accuracy(videos[:1], refs, masks, [1], cfg) == 0.0
    as_uint8 = [((v + 1) * 127.5).round().to(torch.uint8) for v in videos[3:]]  # uint8 videos work the same
    assert identity_retrieval_accuracy(as_uint8, refs, masks, [3], cfg) == 1.0


def test_histogram_consistency_matches_plain_search():
    """The summed-area-table search equals a direct loop over windows for one frame and one window size."""
    ref, mask = _reference(SUBJECTS[0])
    video = _video(SUBJECTS[0], 20, 30, scale=1.5)[:1]
    cfg = MetricsConfig(window_scales=(1.5,), window_stride=0.25, analysis_size=128)
    got = reference_consistency(video, ref, mask, cfg)

    def bins(x: torch.Tensor) -> torch.Tensor:  # [3, ...] in [-1, 1] -> joint 8x8x8 bin
        q = ((x + 1) / 2 * 8).long().clamp(0, 7)
        return (q[0] * 8 + q[1]) * 8 + q[2]

    idx = bins(video[0])  # [H, W]
    ref_hist = torch.bincount(bins(ref)[mask[0] > 0], minlength=512).float()
    ref_hist /= ref_hist.sum()
    best = 0.0
    ys = sorted(set(range(0, H - 18 + 1, 4)) | {H - 18})
    xs = sorted(set(range(0, W - 18 + 1, 4)) | {W - 18})  # window 18 = 12 * 1.5, stride round(18 / 4) = 4
    for y in ys:
        for x0 in xs:
            win = torch.bincount(idx[y : y + 18, x0 : x0 + 18].flatten(), minlength=512).float() / 18**2
            best = max(best, float((win * ref_hist).sqrt().sum()))
    assert got == pytest.approx(best, abs=1e-5)


def test_consistency_with_feature_function():
    """A local model plugs in as a function of [N, 3, S, S] crops in [0, 1]; here a colour-statistics stand-in."""
    seen = []

    def features(images: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(images.shape))
        assert images.min() >= 0 and images.max() <= 1
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], 1) - 0.5  # [N, 6]

    refs, masks = map(torch.stack, zip(*[_reference(s) for s in SUBJECTS]))
    videos = [_video(s, top=20, left=30, scale=1.5) for s in SUBJECTS]
    cfg = MetricsConfig(model_crop=16, model_frames=2, window_scales=(1.0, 1.5), window_stride=0.5)
    assert identity_retrieval_accuracy(videos, refs, masks, [0, 1, 2, 3], cfg, feature_fn=features) == 1.0
    assert seen[0] == (1, 3, 16, 16) and all(s[1:] == (3, 16, 16) for s in seen)


def test_load_feature_model_from_local_folder(tmp_path):
    """Tiny random CLIP and DINOv2 saved locally load through `load_feature_model` (no download)."""
    from transformers import BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, Dinov2Config, Dinov2Model

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                 patch_size=8)
    sizes = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    clip_cfg = CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, vocab_size=99, bos_token_id=0, eos_token_id=1),
                          vision_config=small, projection_dim=8)
    CLIPModel(clip_cfg).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(**sizes).save_pretrained(tmp_path / "clip")
    Dinov2Model(Dinov2Config(**small)).save_pretrained(tmp_path / "dino")
    BitImageProcessor(**sizes).save_pretrained(tmp_path / "dino")
    ref, mask = _reference(SUBJECTS[0])
    video = _video(SUBJECTS[0], 20, 30)[:2]
    cfg = MetricsConfig(model_crop=16, model_frames=1, window_scales=(1.0,), window_stride=1.0)
    for name, dim in (("clip", 8), ("dino", 16)):
        features = load_feature_model(str(tmp_path / name))
        assert features(torch.rand(2, 3, 16, 16)).shape == (2, dim)
        assert -1.0 <= reference_consistency(video, ref, mask, cfg, feature_fn=features) <= 1.0 + 1e-6
    with pytest.raises(FileNotFoundError, match="feature model folder not found"):
        load_feature_model(str(tmp_path / "missing"))


def test_copy_paste_score():
    ref, mask = _reference(SUBJECTS[0], top=10, left=10)
    verbatim = copy_paste_score(_video(SUBJECTS[0], 10, 10), ref, mask)
    shifted = copy_paste_score(_video(SUBJECTS[0], 13, 12), ref, mask)
    scaled = copy_paste_score(_video(SUBJECTS[0], 10, 10, scale=1.5), ref, mask)
    elsewhere = copy_paste_score(_video(SUBJECTS[0], 30, 50), ref, mask)
    assert verbatim == pytest.approx(1.0, abs=1e-6)
    assert elsewhere < shifted < verbatim and scaled < verbatim
    assert 0.0 <= elsewhere
    uint8 = ((_video(SUBJECTS[0], 10, 10) + 1) * 127.5).round().to(torch.uint8)
    assert copy_paste_score(uint8, ref, mask) > 0.99  # only rounding differs


def test_temporal_smoothness_ordering():
    static = _video(SUBJECTS[0], 10, 10, noise=0.0)
    moving = _video(SUBJECTS[0], 10, 10, dx=3, noise=0.0)
    noisy = (static + 0.3 * torch.randn(static.shape)).clamp(-1, 1)
    for mode in ("interpolation", "difference"):
        assert temporal_smoothness(static, mode) == pytest.approx(1.0)
        assert temporal_smoothness(static, mode) > temporal_smoothness(moving, mode) > temporal_smoothness(noisy, mode)
    # plain definition of the default mode
    x = (noisy + 1) / 2
    plain = 1 - (x[1:-1] - (x[:-2] + x[2:]) / 2).abs().mean()
    assert temporal_smoothness(noisy) == pytest.approx(float(plain), abs=1e-6)
    with pytest.raises(ValueError, match="3 frames"):
        temporal_smoothness(static[:2])


@pytest.mark.parametrize("dx,dy,expected", [(4, 0, "right"), (-4, 0, "left"), (0, -3, "up"), (0, 3, "down"),
                                            (0, 0, "none")])
def test_tracker_direction(dx, dy, expected):
    top, left = (30 if dy < 0 else 4), (50 if dx < 0 else 4)
    video = _video(SUBJECTS[1], top, left, dx=dx, dy=dy)
    ref, mask = _reference(SUBJECTS[1])
    track = track_centroids(video, ref, mask)  # [F, 2], (x, y) in [0, 1]
    steps = torch.arange(FRAMES)
    centre = torch.stack([(left + 6 + steps * dx) / W, (top + 6 + steps * dy) / H], dim=1)
    assert (track - centre).abs().max() < 0.03
    assert direction_from_track(track) == expected
    assert direction_from_track(track_centroids(video)) == expected  # background-difference tracker
    prompt = {"right": "moves to the right", "left": "moves to the left", "up": "floats upward",
              "down": "sinks downward", "none": "stays still"}[expected]
    assert text_following(video, f"A cube {prompt}.", ref, mask).match is True


def test_prompt_direction_and_text_following():
    assert prompt_direction("A red ball rolls from the left to the right across the floor.") == "right"
    assert prompt_direction("The cat walks to the left.") == "left"
    assert prompt_direction("A balloon rises slowly into the sky.") == "up"
    assert prompt_direction("Leaves fall down from a tree.") == "down"
    assert prompt_direction("A teapot stands still on the table.") == "none"
    assert prompt_direction("A dog sleeps on a sofa.") is None
    assert prompt_direction("He looks left, then right.") is None  # ambiguous
    video = _video(SUBJECTS[2], 10, 4, dx=5)
    ref, mask = _reference(SUBJECTS[2])
    result = text_following(video, "The toy slides from the left to the right.", ref, mask)
    assert (result.predicted, result.expected, result.match) == ("right", "right", True)
    assert text_following(video, "The toy slides to the left.", ref, mask).match is False
    assert text_following(video, "A toy.", ref, mask).match is None


def test_evaluate_video_collects_metrics():
    ref, mask = _reference(SUBJECTS[0], top=10, left=10)
    video = _video(SUBJECTS[0], 10, 10, dx=3)
    out = evaluate_video(video, ref, mask, "It slides to the right.", MetricsConfig(smoothness="difference"))
    assert out["smoothness"] == temporal_smoothness(video, "difference")
    assert out["consistency"] == reference_consistency(video, ref, mask)
    assert out["copy_paste"] == copy_paste_score(video, ref, mask)
    assert (out["direction"], out["direction_match"]) == ("right", True)
    assert set(evaluate_video(video)) == {"smoothness"}


def test_metric_input_errors():
    ref, mask = _reference(SUBJECTS[0])
    with pytest.raises(ValueError, match="video's size"):
        reference_consistency(_video(SUBJECTS[0], 4, 4)[:, :, :32], ref, mask)
    with pytest.raises(ValueError, match="mask is empty"):
        copy_paste_score(_video(SUBJECTS[0], 4, 4), ref, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="window_stride"):
        MetricsConfig(window_stride=0)
