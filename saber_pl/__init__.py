"""saber_pl: a PyTorch Lightning framework that trains Saber, zero-shot reference-to-video generation.

Saber fine-tunes Wan2.1 on ordinary video-text pairs: a few frames of each clip are cut out with
random masks, warped with a random affine and fed back as references (see docs/ and README.md).
"""

__version__ = "0.1.0"

import logging as _logging

import torch as _torch

if not _torch.cuda.is_available():
    # diffusers imports xformers eagerly when it is installed; on a CPU-only machine its
    # "can't load C++/CUDA extensions" warning is noise (the CPU path never uses xformers).
    _logging.getLogger("xformers").setLevel(_logging.ERROR)
