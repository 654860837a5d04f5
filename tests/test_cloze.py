"""The cloze formulation: records, the packed collator and the classifier against a hand computation."""

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.func import functional_call, vmap

from pyro_ibdr import BayesianLoRA
from pyro_ibdr.experiments.data import commonsense as cs
from pyro_ibdr.experiments.data.commonsense import ClozeCollator, ClozeItem, MCRecord
from pyro_ibdr.experiments.text import ClozeClassifier
from tests._dummies.text import make_tokenizer, tiny_lm, train_and_score

COLOURS = ["red", "green", "blue", "cat"]


def item(context: str, answers: list[str], leads: list[str] | None = None, label: int = 0) -> MCRecord:
    leads = leads or [""] * len(answers)
    return MCRecord(prompt="", question=context, choices=answers, label=label,
                    cloze=ClozeItem(context, list(zip(leads, answers, strict=True))))


RECORDS = [
    item("pick blue", [" red", " green dog", " blue", " cat sun moon"], label=2),
    item("is it the sun dog cat", [" red is", " green", " blue", " cat"], label=1),
    item("the", [" moon", " sun", " dog", " it"], leads=[" A", " B C", "", " D"], label=3),
]


def hand_logits(lm, tok, records, normalization="tokens"):
    """Σ log p(answer tokens | BOS + context + lead) / length, each choice run alone through the full LM."""
    out = torch.zeros(len(records), len(records[0]["cloze"].continuations))
    for b, record in enumerate(records):
        context = tok(record["cloze"].context, add_special_tokens=False)["input_ids"]
        for c, (lead, answer) in enumerate(record["cloze"].continuations):
            lead_ids = tok(lead, add_special_tokens=False)["input_ids"] if lead else []
            answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
            ids = [tok.bos_token_id, *context, *lead_ids, *answer_ids]
            with torch.no_grad():
                log_probs = lm(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            start = len(ids) - len(answer_ids)
            total = sum(log_probs[t - 1, ids[t]].item() for t in range(start, len(ids)))
            out[b, c] = total / (len(answer_ids) if normalization == "tokens" else len(answer))
    return out


def test_records_carry_the_cloze_form_of_each_task():
    (arc,), _ = cs.format_rows("arc_easy", [{"question": "What melts ice?", "answerKey": "A",
                                             "choices": {"text": ["heat", "cold", "dark", "wind"],
                                                         "label": list("ABCD")}}])
    assert arc["cloze"] == ClozeItem("Question: What melts ice?\nAnswer:",
                                     [("", " heat"), ("", " cold"), ("", " dark"), ("", " wind")])
    (wg,), _ = cs.format_rows("winogrande_s", [{"sentence": "Sarah beat Maria so _ got the cup.", "option1": "Sarah",
                                                "option2": "Maria", "answer": "1"}])
    assert wg["cloze"] == ClozeItem("Sarah beat Maria so", [(" Sarah", " got the cup."), (" Maria", " got the cup.")])
    (bq,), _ = cs.format_rows("boolq", [{"question": "is it", "passage": "P.", "answer": False}])
    assert bq["cloze"] == ClozeItem("P.\nQuestion: Is it?\nAnswer:", [("", " yes"), ("", " no")]) and bq["label"] == 1
    with pytest.raises(ValueError, match="one blank"):
        cs.format_rows("winogrande_m", [{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}])


def test_collator_packs_the_context_once_and_masks_the_other_choices():
    tok = make_tokenizer()
    inputs, labels = ClozeCollator(tok, max_length=64)(RECORDS[:2])
    ids, positions, attend = inputs["input_ids"], inputs["position_ids"], inputs["attend"]
    assert labels.tolist() == [2, 1]
    word = {w: tok.convert_tokens_to_ids(w) for w in ["pick", "blue", "red", "green", "dog", "cat", "sun", "moon"]}
    bos = tok.bos_token_id
    # row 0: BOS pick blue | red | green dog | blue | cat sun moon, then padding to the longer row 1
    expected = [bos, word["pick"], word["blue"], word["red"], word["green"], word["dog"], word["blue"], word["cat"],
                word["sun"], word["moon"]]
    assert ids[0, :10].tolist() == expected and (ids[0, 10:] == tok.pad_token_id).all()
    assert positions[0, :10].tolist() == [0, 1, 2, 3, 3, 4, 3, 3, 4, 5]  # every choice continues the context
    assert inputs["source"][0].tolist() == [[2, 0, 0], [2, 4, 0], [2, 0, 0], [2, 7, 8]]
    assert inputs["target"][0, 3].tolist() == [word["cat"], word["sun"], word["moon"]]
    assert inputs["target_mask"][0].sum(-1).tolist() == inputs["lengths"][0].tolist() == [1, 2, 1, 3]
    assert attend[0, 5].tolist()[:10] == [True] * 3 + [False, True, True] + [False] * 4  # "dog": context + own choice
    assert attend[0, 9].tolist()[:10] == [True] * 3 + [False] * 4 + [True] * 3
    assert attend.shape == (2, 12, 12) and attend[0, 11].tolist() == [False] * 11 + [True]  # padding: itself
    chars, _ = ClozeCollator(tok, max_length=64, normalization="chars")(RECORDS[:1])
    assert chars["lengths"].tolist() == [[4.0, 10.0, 5.0, 13.0]]  # len(" green dog") == 10


def test_collator_truncates_the_context_and_names_bad_records():
    tok = make_tokenizer()
    # each choice's own sequence fits in 7: BOS + 4 of the 6 context tokens + the longest answer (2 tokens)
    inputs, _ = ClozeCollator(tok, max_length=7)(RECORDS[1:2])
    assert inputs["input_ids"].shape == (1, 10) and inputs["input_ids"][0, 0] == tok.bos_token_id
    assert tok.convert_ids_to_tokens(inputs["input_ids"][0, 1:5].tolist()) == ["the", "sun", "dog", "cat"]
    with pytest.raises(ValueError, match=r"record 0: .*max_length 2"):
        ClozeCollator(tok, max_length=2)(RECORDS[1:2])
    with pytest.raises(ValueError, match=r"record 1: .*every answer needs a token"):
        ClozeCollator(tok)([RECORDS[0], item("pick", [" red", "", " blue", " cat"])])
    with pytest.raises(ValueError, match="one number of choices"):
        ClozeCollator(tok)([RECORDS[0], item("pick", [" red", " blue"])])
    with pytest.raises(ValueError, match="normalization"):
        ClozeCollator(tok, normalization="bytes")
    no_bos = make_tokenizer("$A")
    with pytest.raises(ValueError, match="record 0, choice 0: the answer has no token before it"):
        ClozeCollator(no_bos)([item("", [" red", " blue"])])


@pytest.mark.parametrize("normalization", ["tokens", "chars"])
def test_logits_equal_the_hand_computed_length_normalised_log_likelihoods(normalization):
    tok = make_tokenizer()
    lm = tiny_lm(len(tok))
    inputs, _ = ClozeCollator(tok, normalization=normalization)(RECORDS)
    with torch.no_grad():
        logits = ClozeClassifier(lm)(**inputs)
    assert logits.shape == (3, 4)
    torch.testing.assert_close(logits, hand_logits(lm, tok, RECORDS, normalization), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a question's logits do not depend on the other questions in its batch
        alone = ClozeClassifier(lm)(**ClozeCollator(tok, normalization=normalization)(RECORDS[2:])[0])
    torch.testing.assert_close(alone, logits[2:], atol=1e-5, rtol=1e-5)


def test_shapes_that_disagree_are_refused():
    tok = make_tokenizer()
    inputs, _ = ClozeCollator(tok)(RECORDS[:2])
    with pytest.raises(ValueError, match="cloze inputs disagree"):
        ClozeClassifier(tiny_lm(len(tok)))(**{**inputs, "lengths": inputs["lengths"][:1]})


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_lora_particles_under_vmap_and_gradients(attn):
    tok = make_tokenizer()
    net = get_peft_model(ClozeClassifier(tiny_lm(len(tok), attn)),
                         LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    inputs, labels = ClozeCollator(tok)(RECORDS)
    g = torch.Generator().manual_seed(1)
    lora = {n: 0.2 * torch.randn(3, *p.shape, generator=g) for n, p in net.named_parameters() if p.requires_grad}

    def forward(params):
        return functional_call(net, params, args=(), kwargs=inputs)

    with torch.no_grad():
        batched = vmap(forward, randomness="different")(lora)
        looped = torch.stack([forward({n: t[k] for n, t in lora.items()}) for k in range(3)])
    torch.testing.assert_close(batched, looped, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(looped[0], looped[1])
    model = BayesianLoRA(net, num_data=3)  # the class logits are differentiable in θ
    theta = model.theta0.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model.logits(theta, inputs), labels)
    (grad,) = torch.autograd.grad(loss, theta)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_lora_learns_the_colour_named_in_the_context():
    """Task: the context names a colour; LoRA on q/v of a random tiny LM must pick that answer well above 25 %."""
    tok = make_tokenizer()
    lm = tiny_lm(len(tok))
    net = get_peft_model(ClozeClassifier(lm), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    rng = random.Random(0)
    collate = ClozeCollator(tok)

    def batch(n):
        labels = [rng.randrange(4) for _ in range(n)]
        return collate([item(f"{rng.choice(['dog', 'sun'])} pick {COLOURS[y]}", [f" {c}" for c in COLOURS], label=y)
                        for y in labels])

    test_inputs, test_labels = batch(200)
    with torch.no_grad():
        before = (net(**test_inputs).argmax(-1) == test_labels).float().mean().item()
    after = train_and_score(net, batch)
    assert after > 0.6 and after > before + 0.2
