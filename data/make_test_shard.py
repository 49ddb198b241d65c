"""Make the small checked-in test shard data/test/tiny-000000.tar (and its README line).

    python data/make_test_shard.py --out data/test --clips 6 --frames 17 --size 32 --fps 16 --seed 0

Procedural clips (saber_pl/synthetic.py, as in the embedded set) as h264 mp4 with txt and json
members, plus one "product photo" reference per subject (ref<i>.png, ref<i>.mask.png), so the same
shard serves both sources (video_text, and triplets for the r2v_triplets ablation at scale tiny).
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from saber_pl.shards import write_samples  # noqa: E402
from saber_pl.synthetic import SyntheticConfig, iter_samples  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/test")
    p.add_argument("--clips", type=int, default=6)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--fps", type=float, default=16.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = SyntheticConfig(num_frames=a.frames, fps=a.fps, height=a.size, width=a.size)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = write_samples(iter_samples(a.seed, "tiny", a.clips, cfg, workers=1), str(out / "tiny-%06d.tar"),
                           maxcount=10**6)
    args = " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    (out / "README.md").write_text(
        "# Test shard\n\n`tiny-000000.tar` was made by `python data/make_test_shard.py "
        f"{args}`: {a.clips} procedural clips of {a.frames} frames, {a.size}x{a.size}, {a.fps:g} fps "
        "(mp4, txt, json, ref<i>.png, ref<i>.mask.png).\n")
    print(json.dumps({"shards": shards, "bytes": sum(Path(s).stat().st_size for s in shards)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
