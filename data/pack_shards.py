"""Pack a folder of videos (or a CSV/JSONL list) into WebDataset shards; see saber_pl/shards.py.

    python data/pack_shards.py /videos --out /data/shards --maxcount 1000
    python data/pack_shards.py --captions triplets.jsonl --out /data/triplets   # path, caption, refs, masks
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from saber_pl.shards import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
