"""Language models as multiple-choice classifiers with (B, C) logits.

:class:`AnswerTokenClassifier` turns a causal LM into a classifier over answer tokens:

    logits[b, c] = (W_head h_b)[answer_ids[c]],    h_b = decoder(x_b)[t_b],

with ``t_b`` the last real (mask = 1) position of row ``b``. Only the ``(B, H)`` hidden states at ``t_b``
go through the LM head, never the full ``(B, T, V)`` vocabulary logits, and the head is called as a module,
so LoRA on ``lm_head`` still applies. Position ids are ``cumsum(mask) - 1``, so a left-padded row gets the
same logits as the unpadded one.

:class:`EncoderChoiceClassifier` returns the ``(B, n_choices)`` logits of an ``AutoModelForMultipleChoice``
(e.g. MiniLM) as a plain tensor.

Both take the batch as keyword tensors (``net(**inputs)``), work inside ``peft.get_peft_model``, under
``torch.func.functional_call`` + ``torch.vmap`` over LoRA parameters (checked with eager and SDPA attention),
and in the fused particle pass (:mod:`pyro_ibdr.particle_lora`), where the decoder returns K·B rows for a
mask of B rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def last_real_position(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last position with mask 1 in each row, for left or right padding: ``(B, T) -> (B,)``."""
    steps = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (attention_mask.long() * (steps + 1)).argmax(-1)


class AnswerTokenClassifier(nn.Module):
    """Next-token logits of a causal LM after the prompt, restricted to ``answer_ids``: ``(B, T) -> (B, C)``.

    ``lm`` is a ``*ForCausalLM`` exposing ``get_decoder()`` (the body returning ``last_hidden_state``) and
    ``get_output_embeddings()`` (the LM head).
    """

    def __init__(self, lm: nn.Module, answer_ids: Sequence[int]) -> None:
        super().__init__()
        if len(answer_ids) < 2:
            raise ValueError(f"need at least two answer token ids, got {list(answer_ids)}")
        vocab = lm.get_output_embeddings().out_features
        bad = [i for i in answer_ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"answer token ids {bad} are outside the vocabulary of size {vocab}")
        self.lm = lm
        ids = torch.as_tensor(list(answer_ids), dtype=torch.long)
        self.register_buffer("answer_ids", ids, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                       position_ids=positions, use_cache=False).last_hidden_state
        positions = last_real_position(attention_mask)
        if hidden.shape[0] != positions.shape[0]:  # K·B particle rows (the fused pass), laid out particle-major
            if hidden.shape[0] % positions.shape[0]:
                raise ValueError(f"the decoder returned {hidden.shape[0]} rows for {positions.shape[0]} examples")
            positions = positions.repeat(hidden.shape[0] // positions.shape[0])
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, positions]  # (B, H), or (K·B, H)
        return self.lm.get_output_embeddings()(last)[..., self.answer_ids]


class EncoderChoiceClassifier(nn.Module):
    """An ``AutoModelForMultipleChoice`` returning its logits as a tensor: ``(B, C, T) -> (B, C)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).logits
