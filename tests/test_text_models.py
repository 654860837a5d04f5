"""Tokenisation (answer ids, collators) and the LM classifiers on tiny offline models."""

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.func import functional_call, vmap
from transformers import BertConfig, BertForMultipleChoice

from pyro_ibdr.experiments.data.commonsense import (
    EncoderChoiceCollator,
    MCRecord,
    MultipleChoiceCollator,
    answer_token_ids,
    build_prompt,
)
from pyro_ibdr.experiments.text import AnswerTokenClassifier, EncoderChoiceClassifier, last_real_position
from tests._dummies.text import make_tokenizer, tiny_lm, train_and_score

LETTERS = "ABCD"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are dominated by thread synchronisation: one thread is 5-30x faster on 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def record(question: str, label: int) -> MCRecord:
    choices = ["red", "green", "blue", "cat"]
    return MCRecord(prompt=build_prompt(question, choices), question=question, choices=choices, label=label)


def test_answer_token_ids_single_tokens_and_errors():
    tok = make_tokenizer()
    ids = answer_token_ids(tok, LETTERS)
    assert tok.convert_ids_to_tokens(ids) == list(LETTERS)
    with pytest.raises(ValueError, match="'A B' after 'Answer:' is not a single token"):
        answer_token_ids(tok, ["A B", "C"])
    with pytest.raises(ValueError, match="share token ids"):
        answer_token_ids(tok, ["A", "A"])


def test_causal_collator_left_truncates_keeps_bos_and_pads():
    tok = make_tokenizer()
    recs = [record("pick red", 0), record("pick red dog cat sun moon is it green", 1)]
    for side in ("left", "right"):
        inputs, labels = MultipleChoiceCollator(tok, max_length=20, padding_side=side)(recs)
        assert labels.tolist() == [0, 1] and inputs["input_ids"].shape == inputs["attention_mask"].shape
        last = last_real_position(inputs["attention_mask"])
        tail = tok("Answer:", add_special_tokens=False)["input_ids"][-1]
        assert inputs["input_ids"][torch.arange(2), last].tolist() == [tail, tail]
        first = inputs["attention_mask"].argmax(-1)
        assert inputs["input_ids"][torch.arange(2), first].tolist() == [tok.bos_token_id] * 2
        assert inputs["attention_mask"].sum(-1).max() == 20  # the long prompt was cut to max_length
    with pytest.raises(ValueError, match="padding_side"):
        MultipleChoiceCollator(tok, padding_side="middle")


def test_encoder_collator_shapes():
    tok = make_tokenizer("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1")
    inputs, labels = EncoderChoiceCollator(tok, max_length=16)([record("pick red", 0), record("is it", 2)])
    assert inputs["input_ids"].shape[:2] == (2, 4) and labels.tolist() == [0, 2]
    assert inputs["input_ids"][1, 3].tolist()[:6] == tok("is it", "cat")["input_ids"]
    odd = MCRecord(prompt="", question="q", choices=["a"], label=0)
    with pytest.raises(ValueError, match="one number of choices"):
        EncoderChoiceCollator(tok)([record("x", 0), odd])


def test_answer_classifier_matches_full_lm_and_padding_sides():
    tok = make_tokenizer()
    ids = answer_token_ids(tok, LETTERS)
    lm = tiny_lm(len(tok))
    clf = AnswerTokenClassifier(lm, ids)
    recs = [record("pick blue", 2), record("pick green dog cat sun", 1), record("is it", 3)]
    left, _ = MultipleChoiceCollator(tok, padding_side="left")(recs)
    right, _ = MultipleChoiceCollator(tok, padding_side="right")(recs)
    with torch.no_grad():
        out_left, out_right = clf(**left), clf(**right)
        alone = torch.cat([clf(**MultipleChoiceCollator(tok)([r])[0]) for r in recs])
        full = lm(**right, position_ids=torch.arange(right["input_ids"].shape[1]).expand(3, -1)).logits
    assert out_left.shape == (3, 4)
    expected = full[torch.arange(3), right["attention_mask"].sum(-1) - 1][:, ids]
    torch.testing.assert_close(out_right, expected)
    torch.testing.assert_close(out_left, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_right, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        AnswerTokenClassifier(lm, [0, 10_000])


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_peft_lora_vmap_over_particles_matches_loop(attn):
    tok = make_tokenizer()
    net = get_peft_model(AnswerTokenClassifier(tiny_lm(len(tok), attn), answer_token_ids(tok, LETTERS)),
                         LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    inputs, _ = MultipleChoiceCollator(tok)([record("pick blue", 2), record("pick red dog", 0)])
    assert isinstance(net(**inputs), torch.Tensor) and net(**inputs).shape == (2, 4)
    g = torch.Generator().manual_seed(1)
    lora = {n: 0.2 * torch.randn(3, *p.shape, generator=g)
            for n, p in net.named_parameters() if p.requires_grad}
    assert len(lora) == 8  # A and B of q_proj and v_proj in two layers

    def forward(params):
        return functional_call(net, params, args=(), kwargs=inputs)

    with torch.no_grad():
        batched = vmap(forward, randomness="different")(lora)
        looped = torch.stack([forward({n: t[k] for n, t in lora.items()}) for k in range(3)])
    assert batched.shape == (3, 2, 4)
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(looped[0], looped[1])


def test_lora_on_lm_head_reaches_the_answer_logits():
    tok = make_tokenizer()
    net = get_peft_model(AnswerTokenClassifier(tiny_lm(len(tok)), answer_token_ids(tok, LETTERS)),
                         LoraConfig(r=4, target_modules=["lm_head"]))
    inputs, _ = MultipleChoiceCollator(tok)([record("pick blue", 2)])
    with torch.no_grad():
        before = net(**inputs)
        for name, param in net.named_parameters():
            if "lm_head.lora_B" in name:
                param.fill_(0.5)
        after = net(**inputs)
    assert not torch.allclose(before, after)


def test_lora_learns_letter_written_in_prompt():
    """Task: the prompt says "pick <letter>"; LoRA on q/v of a random tiny LM must beat chance (25%)."""
    tok = make_tokenizer()
    net = get_peft_model(AnswerTokenClassifier(tiny_lm(len(tok)), answer_token_ids(tok, LETTERS)),
                         LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    rng = random.Random(0)
    nouns = ["dog", "cat", "sun", "moon"]

    def batch(n):
        labels = [rng.randrange(4) for _ in range(n)]
        recs = [record(f"{rng.choice(nouns)} pick {LETTERS[y]} {rng.choice(nouns)}", y) for y in labels]
        return MultipleChoiceCollator(tok)(recs)

    assert train_and_score(net, batch) > 0.6


def test_encoder_choice_classifier_with_lora():
    tok = make_tokenizer("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1")
    torch.manual_seed(0)
    bert = BertForMultipleChoice(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64))
    net = get_peft_model(EncoderChoiceClassifier(bert), LoraConfig(r=4, target_modules=["query", "value"],
                                                                    modules_to_save=["classifier"]))
    inputs, _ = EncoderChoiceCollator(tok)([record("pick red", 0), record("is it", 1), record("sun", 3)])
    out = net(**inputs)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 4)


def test_model_assets_locate_files_and_load_minilm_folder(tmp_path, monkeypatch):
    from pyro_ibdr.experiments.assets import minilm, smollm2

    monkeypatch.setattr(smollm2, "package_root", lambda *args, **kwargs: tmp_path)
    monkeypatch.setattr(minilm, "package_root", lambda *args, **kwargs: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not contain SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        smollm2.smollm2_gguf()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        minilm.minilm_dir()
    config = BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64)
    BertForMultipleChoice(config).save_pretrained(tmp_path / "model")
    make_tokenizer("[CLS] $A [SEP]").save_pretrained(tmp_path / "model")
    tok, model = minilm.load_minilm_multiple_choice()
    assert isinstance(model, BertForMultipleChoice) and tok("pick red")["input_ids"][0] == tok.cls_token_id
