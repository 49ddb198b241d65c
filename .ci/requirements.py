"""Print the requirements of setup.cfg (install_requires + the given extras, default: test), one per line.

Used by the Makefile to install the dependencies into .venv without a setup.py / pyproject.toml.
"""

import configparser
import sys
from pathlib import Path

cfg = configparser.ConfigParser()
cfg.read(Path(__file__).resolve().parent.parent / "setup.cfg")
extras = sys.argv[1:] or ["test"]
reqs = cfg["options"]["install_requires"].split("\n")
for extra in extras:
    reqs += cfg["options.extras_require"][extra].split("\n")
print("\n".join(r.strip() for r in reqs if r.strip() and not r.strip().startswith("#")))
