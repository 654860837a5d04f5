"""Language models as multiple-choice classifiers with (B, C) logits.

:class:`AnswerTokenClassifier` (the BLoB letter formulation) turns a causal LM into a classifier over answer
tokens:

    logits[b, c] = (W_head h_b)[answer_ids[c]],    h_b = decoder(x_b)[t_b],

with ``t_b`` the last real (mask = 1) position of row ``b``. Only the ``(B, H)`` hidden states at ``t_b``
go through the LM head, never the full ``(B, T, V)`` vocabulary logits, and the head is called as a module,
so LoRA on ``lm_head`` still applies. Position ids are ``cumsum(mask) - 1``, so a left-padded row gets the
same logits as the unpadded one.

:class:`ClozeClassifier` (the cloze formulation of evaluation harnesses) scores each answer's own text:

    logits[b, c] = (1 / n[b, c]) Σ_{t ∈ answer(b, c)} log p(x_t | context_b, lead_{b,c}, x_{<t}),

the log-likelihood of the answer tokens given the context, divided by the answer length ``n`` in tokens or
in characters (the collator's choice, :class:`~pyro_ibdr.experiments.data.commonsense.ClozeCollator`). A
question is one packed row: its context once, then every choice's tokens, with an attention mask that lets
each choice see the context and itself only, so the shared context is computed once for all ``C`` choices
and every question of the batch goes through the LM in one pass.

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


class ClozeClassifier(nn.Module):
    """Length-normalised log-likelihood of each answer given its context: packed rows ``(B, T) -> (B, C)``.

    Inputs (from :class:`~pyro_ibdr.experiments.data.commonsense.ClozeCollator`):

    - ``input_ids``, ``position_ids`` ``(B, T)``: context tokens, then each choice's tokens; a choice's
      positions continue from the end of the context, as if it followed the context alone;
    - ``attend`` ``(B, T, T)`` bool: token ``i`` may attend to token ``j`` (causal, context + own choice);
    - ``source`` ``(B, C, L)``: for each scored token, the position whose next-token distribution predicts it;
    - ``target`` ``(B, C, L)``: the scored token ids; ``target_mask`` ``(B, C, L)``: 1 on real ones;
    - ``lengths`` ``(B, C)``: the divisor ``n`` (answer tokens or characters).

    Only the ``C · L`` predicting hidden states go through the LM head (``(B, C·L, V)``, never ``(B, T, V)``),
    as a module call, so LoRA on ``lm_head`` applies; the logits are differentiable in every LoRA weight.
    Source: the cloze ("completion") formulation of OLMES (Gu et al., 2024) and lm-evaluation-harness;
    context sharing by attention masking as in tree attention.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attend: torch.Tensor,
                source: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor,
                lengths: torch.Tensor) -> torch.Tensor:
        batch, width = input_ids.shape
        choices, span = source.shape[1:]
        if attend.shape != (batch, width, width) or target.shape != source.shape \
                or target_mask.shape != source.shape or lengths.shape != (batch, choices):
            raise ValueError(f"cloze inputs disagree: input_ids {tuple(input_ids.shape)}, attend "
                             f"{tuple(attend.shape)}, source {tuple(source.shape)}, target {tuple(target.shape)}, "
                             f"target_mask {tuple(target_mask.shape)}, lengths {tuple(lengths.shape)}")
        dtype = self.lm.get_input_embeddings().weight.dtype
        mask = torch.zeros(attend.shape, dtype=dtype, device=attend.device)
        mask = mask.masked_fill(~attend.bool(), torch.finfo(dtype).min)[:, None]  # additive (B, 1, T, T)
        hidden = self.lm.get_decoder()(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                       use_cache=False).last_hidden_state
        rows = source.reshape(batch, choices * span, 1).expand(-1, -1, hidden.shape[-1])
        logits = self.lm.get_output_embeddings()(hidden.gather(1, rows))  # (B, C·L, V)
        token_ll = logits.log_softmax(-1).gather(-1, target.reshape(batch, choices * span, 1))
        token_ll = token_ll.reshape(batch, choices, span) * target_mask.to(token_ll.dtype)
        return token_ll.sum(-1) / lengths.to(token_ll.dtype)


class EncoderChoiceClassifier(nn.Module):
    """An ``AutoModelForMultipleChoice`` returning its logits as a tensor: ``(B, C, T) -> (B, C)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).logits
