"""An offline word-level tokenizer, a tiny random Llama and a JSONL writer, for the text tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "<s>", "</s>", "[CLS]", "[SEP]"]
WORDS = ["Select", "one", "of", "the", "choices", "that", "answers", "following", "question", ":", "Choices",
         ")", "Answer", "A", "B", "C", "D", "pick", "red", "green", "blue", "cat", "dog", "sun", "moon",
         "is", "it"]


def make_tokenizer(template: str = "<s> $A", pair: str | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over SPECIALS + WORDS (others map to [UNK]); its post-processor adds the specials
    named in ``template`` / ``pair``."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, pair=pair, special_tokens=[(s, vocab[s]) for s in SPECIALS[2:]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="<s>", eos_token="</s>", cls_token="[CLS]", sep_token="[SEP]")


def tiny_lm(vocab_size: int, attn: str = "eager") -> LlamaForCausalLM:
    """A seeded random 2-layer, 32-wide Llama (4 query / 2 key-value heads, 128 positions) in eval mode."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=attn)
    return LlamaForCausalLM(cfg).eval()


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """``rows`` as one JSON object per line (the raw HF row layout of ``--source files``)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def train_and_score(net: torch.nn.Module, batch: Callable[[int], Batch], steps: int = 40, lr: float = 1e-2) -> float:
    """Adam on ``net``'s trainable tensors for ``steps`` batches of 16 (cross-entropy on its class logits), then
    the accuracy on a fresh batch of 200."""
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        inputs, labels = batch(16)
        loss = torch.nn.functional.cross_entropy(net(**inputs), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    inputs, labels = batch(200)
    with torch.no_grad():
        return (net(**inputs).argmax(-1) == labels).float().mean().item()
