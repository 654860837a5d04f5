"""Tiny peft LoRA networks of every family the fused particle pass covers, with matching inputs.

Each builder returns ``(net, inputs, first_block)``: the peft model, a batch of B = 3 examples (a tensor, or a
dict of keyword tensors), and the first module of its block list (the prefix that runs before it is the
embedding). All backbone dropout is 0, so LoRA dropout is the only randomness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import peft
import timm
import torch
from torch import nn
from transformers import BertConfig, BertForMultipleChoice, BertForSequenceClassification, GPT2Config, GPT2Model

from pyro_ibdr.experiments.data.commonsense import MCRecord, MultipleChoiceCollator, answer_token_ids, build_prompt
from pyro_ibdr.experiments.text import AnswerTokenClassifier, EncoderChoiceClassifier
from pyro_ibdr.experiments.vision import split_qkv, vit_lora_config
from tests._dummies.nets import TinyMLP
from tests._dummies.text import make_tokenizer, tiny_lm

Built = tuple[nn.Module, Any, nn.Module | None]
VOCAB = 40


def _lora(layers: Sequence[int] | None, pattern: str, **options: Any) -> peft.LoraConfig:
    placement = {"layers_to_transform": list(layers), "layers_pattern": pattern} if layers is not None else {}
    options = {"r": 4, "lora_alpha": 8, **options}
    return peft.LoraConfig(**placement, **options)


def _token_batch(rows: int = 3, length: int = 7, padded: bool = True) -> dict[str, torch.Tensor]:
    """Random token ids with the first rows left-padded (mask 0) by 0, 2, 4, ... positions."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(6, VOCAB, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    if padded:
        for row in range(rows):
            mask[row, : min(2 * row, length - 2)] = 0
    return {"input_ids": ids, "attention_mask": mask}


def mlp(lora_dropout: float = 0.0, **options: Any) -> Built:
    """TinyMLP (no block list: particles join at the input), LoRA on fc1/fc2, trained head."""
    torch.manual_seed(0)
    config = _lora(None, "", target_modules=["fc1", "fc2"], modules_to_save=["head"], lora_dropout=lora_dropout,
                   **options)
    return peft.get_peft_model(TinyMLP(), config), torch.rand(3, 64), None


def vit(lora_dropout: float = 0.0, layers: Sequence[int] | None = None) -> Built:
    """A 3-block timm ViT (dim 32, 4×4 patches of 8×8 images) with split q/v, LoRA on q and v, trained head."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=4, embed_dim=32,
                              depth=3, num_heads=2, num_classes=5, in_chans=1)
    if layers is None:  # the library's own placement
        config = vit_lora_config(4, 8, dropout=lora_dropout)
    else:  # peft places layers_to_transform only with a list of target names
        config = _lora(layers, "blocks", target_modules=["q", "v"], modules_to_save=["head"], lora_dropout=lora_dropout)
    net = peft.get_peft_model(split_qkv(model), config)
    return net, torch.rand(3, 1, 8, 8), model.blocks[0]


def llama(lora_dropout: float = 0.0, layers: Sequence[int] | None = None) -> Built:
    """A 2-layer Llama as an answer-letter classifier; LoRA on q, v (and the LM head unless ``layers``)."""
    tok = make_tokenizer()
    lm = tiny_lm(len(tok))
    targets = ["q_proj", "v_proj"] if layers is not None else ["q_proj", "v_proj", "lm_head"]
    config = _lora(layers, "layers", target_modules=targets, lora_dropout=lora_dropout)
    torch.manual_seed(0)
    net = peft.get_peft_model(AnswerTokenClassifier(lm, answer_token_ids(tok, "ABCD")), config)
    colours = ["red", "green", "blue", "cat"]
    records = [MCRecord(prompt=build_prompt(q, colours), question=q, choices=colours, label=i)
               for i, q in enumerate(["pick blue", "pick green dog cat sun", "is it"])]
    inputs, _ = MultipleChoiceCollator(tok, padding_side="right")(records)  # rows end at different positions
    return net, inputs, lm.model.layers[0]


def _bert_config(**overrides: Any) -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **overrides)


def bert(lora_dropout: float = 0.0, layers: Sequence[int] | None = None) -> Built:
    """A 3-layer BERT sequence classifier (3 labels), LoRA on query/value, trained classifier head."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_config(num_labels=3)).eval()
    config = _lora(layers, "layer", target_modules=["query", "value"], modules_to_save=["classifier"],
                   lora_dropout=lora_dropout)
    inputs = _token_batch()
    inputs["token_type_ids"] = (torch.arange(7) >= 4).long().expand(3, -1).clone()
    return peft.get_peft_model(model, config), inputs, model.bert.encoder.layer[0]


def bert_choice(lora_dropout: float = 0.0) -> Built:
    """A BERT multiple-choice encoder (inputs (B, 4 choices, T)): the blocks see B·4 rows per particle."""
    torch.manual_seed(0)
    model = BertForMultipleChoice(_bert_config()).eval()
    config = _lora(None, "", target_modules=["query", "value"], modules_to_save=["classifier"],
                   lora_dropout=lora_dropout)
    batch = _token_batch(rows=12, padded=False)
    inputs = {k: v.reshape(3, 4, -1) for k, v in batch.items()}
    return peft.get_peft_model(EncoderChoiceClassifier(model), config), inputs, model.bert.encoder.layer[0]


class LastTokenClassifier(nn.Module):
    """A GPT-2 body read at the last position (inputs are left-padded), then a linear head: (B, T) → (B, C)."""

    def __init__(self, body: nn.Module, num_classes: int = 3) -> None:
        super().__init__()
        self.body = body
        self.head = nn.Linear(body.config.n_embd, num_classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden[:, -1])


def gpt2(lora_dropout: float = 0.0, layers: Sequence[int] | None = None) -> Built:
    """A 2-block GPT-2 (its attention projection is a ``Conv1D``) with rsLoRA on ``c_attn``, trained head."""
    torch.manual_seed(0)
    body = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0,
                                eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    config = _lora(layers, "h", target_modules=["c_attn"], fan_in_fan_out=True, use_rslora=True,
                   modules_to_save=["head"], lora_dropout=lora_dropout)
    return peft.get_peft_model(LastTokenClassifier(body), config), _token_batch(), body.h[0]


FAMILIES = {"mlp": mlp, "vit": vit, "llama": llama, "bert": bert, "bert_choice": bert_choice, "gpt2": gpt2}
#: The families whose LoRA can sit on the last blocks only, with the index of that last block.
LAST_BLOCKS = {"vit": [2], "llama": [1], "bert": [2], "gpt2": [1]}
