"""``python -m examples.commonsense`` end to end: a tiny random Llama saved to a folder, raw-layout JSONL files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import click
import pytest
import torch
from click.testing import CliRunner, Result
from transformers import AutoModelForCausalLM, AutoTokenizer

from pyro_ibdr.experiments import cli, commonsense
from pyro_ibdr.experiments.data.commonsense import ClozeCollator, CommonsenseSplits, format_rows, get_task, load_files
from pyro_ibdr.experiments.text import ClozeClassifier
from tests._dummies.cli import assert_help_documents_every_option, error_message
from tests._dummies.text import make_tokenizer, tiny_lm, write_jsonl

SMALL = ["--source", "files", "--particles", "2", "--steps", "3", "--batch-size", "4", "--max-length", "64",
         "--num-samples", "2", "--max-test", "0", "--threads", "1"]
COLOURS = ["red", "green", "blue", "cat"]
LORA_SIZE = 2 * (8 * (32 + 32) + 8 * (32 + 16))  # rank 8 on q (32 -> 32) and v (32 -> 2 heads x 8) in 2 layers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` load: tokenizer + tiny Llama."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(folder)
    tiny_lm(len(tokenizer)).save_pretrained(folder)
    return folder


def _arc_rows(n: int, offset: int = 0) -> list[dict[str, Any]]:
    """ARC rows (HF layout) asking for a colour by name; keys rotate so every letter is an answer."""
    rows = []
    for i in range(offset, offset + n):
        answer = i % 4
        rows.append({"id": f"q{i}", "question": f"pick {COLOURS[answer]}",
                     "choices": {"text": COLOURS, "label": list("ABCD")}, "answerKey": "ABCD"[answer]})
    return rows


def _boolq_rows(n: int) -> list[dict[str, Any]]:
    return [{"question": f"is it {COLOURS[i % 4]}", "passage": f"the sun is {COLOURS[i % 2]}", "answer": i % 2 == 0}
            for i in range(n)]


@pytest.fixture
def arc_files(tmp_path: Path) -> tuple[Path, Path]:
    """8 four-choice training rows plus one five-choice row (dropped); 6 test rows."""
    five = {"id": "q5c", "question": "pick one", "answerKey": "E",
            "choices": {"text": [*COLOURS, "dog"], "label": list("ABCDE")}}
    train = write_jsonl(tmp_path / "train.jsonl", [*_arc_rows(8), five])
    test = write_jsonl(tmp_path / "test.jsonl", _arc_rows(6, offset=8))
    return train, test


def _invoke(model: Path, train: Path, test: Path, output: Path, *extra: str) -> Result:
    args = ["--model", str(model), "--train-file", str(train), "--test-file", str(test), "--output", str(output),
            *SMALL, *extra]
    return CliRunner().invoke(commonsense.main, args)


def test_cli_end_to_end_on_arc_files(model_dir: Path, arc_files: tuple[Path, Path], tmp_path: Path) -> None:
    """The BLoB letter formulation, without the zero-shot row."""
    output = tmp_path / "out"
    result = _invoke(model_dir, *arc_files, output, "--tasks", "arc_easy", "--methods", "map,ibdr",
                     "--formulation", "letter", "--no-zero-shot")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for metric in ("accuracy", "ece"):
        assert next(line for line in lines if line.startswith(metric)).split() == [metric, "map", "ibdr"]
    assert sum(line.split()[:1] == ["arc_easy"] for line in lines) == 2  # the task row of each table
    assert sum(line.split()[:1] == ["mean"] for line in lines) == 2  # the mean row of each table
    assert "results.json" in lines[-1] and "results.csv" in lines[-1]

    saved = json.loads((output / "results.json").read_text())
    config = saved["config"]
    assert (config["tasks"], config["source"], config["methods"]) == (["arc_easy"], "files", ["map", "ibdr"])
    assert (config["model"], config["particles"], config["steps"], config["threads"]) == (str(model_dir), 2, 3, 1)
    assert (config["formulation"], config["length_normalization"], config["zero_shot"]) == ("letter", None, False)
    assert [(r["task"], r["method"]) for r in saved["summary"]] == [
        ("arc_easy", "map"), ("arc_easy", "ibdr"), ("mean", "map"), ("mean", "ibdr")]
    runs = {r["method"]: r for r in saved["runs"]}
    for method, passes, samples in (("map", 1, 1), ("ibdr", 4, 2)):  # IBDR: K = 2 particles, 2 passes each
        record = runs[method]
        assert record == json.loads((output / "runs" / f"arc_easy__{method}__seed0.json").read_text())
        metrics = record["metrics"]
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["ece"] <= 1 and metrics["nll"] > 0
        assert record["data"] == {"train": 8, "test": 6, "dropped": 1, "n_choices": 4}
        cost = record["cost"]
        assert (cost["steps"], cost["passes_per_step"], cost["test_samples"]) == (3, passes, samples)
        assert cost["trainable_parameters"] == LORA_SIZE
        assert (output / "reliability" / f"arc_easy__{method}__seed0.png").read_bytes()[:4] == b"\x89PNG"
    assert runs["ibdr"]["state"]["settings"]["alpha"] > 0  # K = 2 <= C − 1 = 3: diversity stays on
    with open(output / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["task"], r["method"]) for r in rows] == [(r["task"], r["method"]) for r in saved["summary"]]
    assert float(rows[1]["nll"]) == pytest.approx(runs["ibdr"]["metrics"]["nll"])


@pytest.mark.filterwarnings("ignore:S = 2 draws exceed C − 1:UserWarning")  # the test-set DPP volume metric
def test_two_choice_task_keeps_alpha_and_gets_a_constant_diversity_term(model_dir: Path, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", _boolq_rows(8))
    test = write_jsonl(tmp_path / "test.jsonl", _boolq_rows(4))
    output = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"K = 2 particles exceed C − 1 = 1 .* the diversity term is constant"):
        result = _invoke(model_dir, train, test, output, "--tasks", "BoolQ", "--methods", "ibdr", "--alpha", "0.5")
    assert result.exit_code == 0, result.output
    record = json.loads((output / "runs" / "boolq__ibdr__seed0.json").read_text())
    assert record["state"]["settings"]["alpha"] == 0.5  # the library, not the CLI, handles K > C − 1
    assert all(epoch["diversity"] == 0.0 for epoch in record["history"])
    assert record["data"] == {"train": 8, "test": 4, "dropped": 0, "n_choices": 2}
    assert 0 <= record["metrics"]["accuracy"] <= 1 and record["cost"]["test_samples"] == 2


def test_the_official_preset_shapes_ibdr(model_dir: Path, arc_files: tuple[Path, Path], tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = _invoke(model_dir, *arc_files, output, "--tasks", "arc_easy", "--methods", "ibdr", "--preset", "official",
                     "--lr", "5e-4")
    assert result.exit_code == 0, result.output
    record = json.loads((output / "runs" / "arc_easy__ibdr__seed0.json").read_text())
    assert record["metrics"]["ensemble"] == "mean_logits"
    assert record["state"]["settings"]["cost"] == "output" and record["state"]["settings"]["dual_lr"] == 5e-4
    config = json.loads((output / "results.json").read_text())["config"]
    assert config["preset"]["name"] == "official" and config["preset"]["optim"]["optimizer"] == "adamw"


def test_bad_input_is_refused_before_loading(model_dir: Path, arc_files: tuple[Path, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused command must not load a model")

    monkeypatch.setattr(commonsense, "load_backbone", no_loading)
    output = tmp_path / "out"
    message = error_message(_invoke(model_dir, *arc_files, output, "--methods", "map,mystery"))
    assert "unknown methods ['mystery']" in message and "ibdr" in message and "--methods" in message
    message = error_message(_invoke(model_dir, *arc_files, output, "--tasks", "hellaswag"))
    assert "'hellaswag'" in message and "known" in message and "arc_easy" in message and "boolq" in message
    message = error_message(CliRunner().invoke(commonsense.main, ["--source", "files", "--output", str(output)]))
    assert "--source files needs --train-file and --test-file" in message
    message = error_message(_invoke(model_dir, *arc_files, output, "--tasks", "arc_easy,boolq"))
    assert "--tasks" in message and "one task" in message
    message = error_message(_invoke(model_dir, *arc_files, output, "--methods", " , "))
    assert "--methods" in message and "at least one" in message
    message = error_message(_invoke(model_dir, arc_files[0], tmp_path / "absent.jsonl", output))
    assert "--test-file" in message and "absent.jsonl" in message and "does not exist" in message
    assert not output.exists()


def test_cloze_default_prints_zero_shot_beside_the_methods(model_dir: Path, arc_files: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = _invoke(model_dir, *arc_files, output, "--tasks", "arc_easy", "--methods", "map,ibdr",
                     "--length-normalization", "chars")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for metric in ("accuracy", "ece"):
        assert next(line for line in lines if line.startswith(metric)).split() == [metric, "zero_shot", "map", "ibdr"]
    saved = json.loads((output / "results.json").read_text())
    config = saved["config"]
    assert (config["formulation"], config["length_normalization"], config["eval_split"]) == ("cloze", "chars", "test")
    assert config["device"] == ("cuda" if torch.cuda.is_available() else "cpu") and config["device_name"]
    assert {"torch", "pyro", "peft", "transformers", "python"} <= set(config["versions"])
    runs = {r["method"]: r for r in saved["runs"]}
    zero = runs["zero_shot"]
    assert zero["cost"]["steps"] == 0 and zero["cost"]["test_samples"] == 1 and zero["history"] == []
    assert zero["cost"]["trainable_parameters"] == LORA_SIZE == runs["map"]["cost"]["trainable_parameters"]
    # zero-shot = the untrained model through the same cloze classifier and metrics
    tokenizer, lm = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    test = load_files("arc_easy", *arc_files).test
    inputs, labels = ClozeCollator(tokenizer, 64, "chars")(test)
    with torch.no_grad():
        logits = ClozeClassifier(lm.eval())(**inputs)
    assert zero["metrics"]["accuracy"] == pytest.approx((logits.argmax(-1) == labels).float().mean().item())
    nll = torch.nn.functional.cross_entropy(logits, labels).item()
    assert zero["metrics"]["nll"] == pytest.approx(nll, rel=1e-4)
    assert runs["map"]["metrics"]["nll"] != pytest.approx(nll, rel=1e-4)  # map trained: it differs


def test_select_evaluates_on_held_out_training_questions(model_dir: Path, arc_files: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    output = tmp_path / "out"
    result = _invoke(model_dir, *arc_files, output, "--tasks", "arc_easy", "--methods", "map", "--select", "3")
    assert result.exit_code == 0, result.output
    saved = json.loads((output / "results.json").read_text())
    assert saved["config"]["eval_split"] == "validation (3 training questions)"
    assert {r["method"]: r["data"]["train"] for r in saved["runs"]} == {"zero_shot": 5, "map": 5}
    assert all(r["data"]["test"] == 3 for r in saved["runs"])
    message = error_message(_invoke(model_dir, *arc_files, tmp_path / "o2", "--tasks", "arc_easy", "--select", "8"))
    assert "validation part of 8 questions needs 0 < size < 8" in message


def test_empty_splits_are_refused_before_loading_the_model(model_dir: Path, arc_files: tuple[Path, Path],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused command must not load a model")

    monkeypatch.setattr(commonsense, "load_backbone", no_loading)
    train, _ = arc_files
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    message = error_message(_invoke(model_dir, train, empty, tmp_path / "out", "--tasks", "arc_easy"))
    assert f"arc_easy: the test split ({empty}) is empty: it has no rows" in message
    three = write_jsonl(tmp_path / "three.jsonl", [
        {"id": f"t{i}", "question": "pick red", "answerKey": "A",
         "choices": {"text": COLOURS[:3], "label": list("ABC")}} for i in range(2)])
    message = error_message(_invoke(model_dir, train, three, tmp_path / "out", "--tasks", "arc_easy"))
    assert "the test split" in message and "all 2 rows were dropped, none has the task's 4 choices" in message
    message = error_message(_invoke(model_dir, three, arc_files[1], tmp_path / "out", "--tasks", "arc_easy"))
    assert "the train split" in message and "all 2 rows were dropped" in message
    assert not (tmp_path / "out").exists()


def test_a_device_without_hardware_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with a GPU
    message = error_message(CliRunner().invoke(commonsense.main, ["--device", "cuda"]))
    assert "--device" in message and "no CUDA GPU is visible" in message
    message = error_message(CliRunner().invoke(commonsense.main, ["--device", "tpu7"]))
    assert "unknown device 'tpu7'" in message


def test_help_documents_every_option() -> None:
    assert len([p for p in commonsense.main.params if isinstance(p, click.Option)]) >= 23
    assert_help_documents_every_option(commonsense.main)


def test_a_saved_posterior_scores_new_questions(model_dir: Path, arc_files: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    output = tmp_path / "out"
    assert _invoke(model_dir, *arc_files, output, "--tasks", "arc_easy", "--methods", "ibdr").exit_code == 0
    record = json.loads((output / "runs" / "arc_easy__ibdr__seed0.json").read_text())
    assert (output / "report.md").is_file()
    posterior = output / record["posterior"]
    result = CliRunner().invoke(cli.main, ["predict", str(posterior)])  # the run's own test file
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    assert {m: scores["metrics"][m] for m in ("accuracy", "ece", "nll", "brier")} == {
        m: record["metrics"][m] for m in ("accuracy", "ece", "nll", "brier")}
    assert scores["data"] == {"task": "arc_easy", "test_file": str(arc_files[1]), "dropped": 0, "examples": 6}
    new = write_jsonl(tmp_path / "new.jsonl", _arc_rows(10, offset=20))
    result = CliRunner().invoke(cli.main, ["predict", str(posterior), "--test-file", str(new), "--output",
                                           str(tmp_path / "scores.json")])
    assert result.exit_code == 0, result.output
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["data"]["examples"] == 10 and scores["metrics"]["num_samples"] == 2
    message = error_message(CliRunner().invoke(cli.main, ["predict", str(posterior), "--split", "test"]))
    assert "--split do(es) not apply to a commonsense posterior" in message


def test_the_offline_default_runs_the_six_datasets_with_zero_shot_map_and_ibdr(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No data or model options: every paper dataset from the offline source, through the tiny Llama."""
    asked = []

    def offline(task: str, source: str, **files: Path) -> CommonsenseSplits:
        asked.append((task, source, files))
        kind, rows = ("boolq", _boolq_rows(10)) if get_task(task).n_choices == 2 else ("arc_easy", _arc_rows(10))
        records, _ = format_rows(kind, rows)
        return CommonsenseSplits(task, records[:6], records[6:], get_task(task).n_choices, 0)

    def tiny_backbone(name: str, *, load_in_8bit: bool) -> tuple[object, torch.nn.Module, bool]:
        assert (name, load_in_8bit) == (commonsense.OFFLINE_LM, False)
        tokenizer = make_tokenizer()
        return tokenizer, tiny_lm(len(tokenizer)), False

    monkeypatch.setattr(commonsense, "load_commonsense", offline)
    monkeypatch.setattr(commonsense, "load_backbone", tiny_backbone)
    output = tmp_path / "out"
    result = CliRunner().invoke(commonsense.main, ["--output", str(output), "--threads", "1", "--steps", "1",
                                                  "--num-samples", "2"])
    assert result.exit_code == 0, result.output
    six = ["winogrande_s", "arc_challenge", "arc_easy", "winogrande_m", "obqa", "boolq"]
    assert asked == [(task, "offline", {}) for task in six]
    accuracy = next(line for line in result.stdout.splitlines() if line.startswith("accuracy"))
    assert accuracy.split() == ["accuracy", "zero_shot", "map", "ibdr"]
    saved = json.loads((output / "results.json").read_text())
    assert saved["config"]["formulation"] == "cloze" and saved["config"]["eval_split"] == "test"
    assert sorted((r["task"], r["method"]) for r in saved["runs"]) == sorted(
        (task, method) for task in six for method in ("zero_shot", "map", "ibdr"))

def test_without_num_samples_each_method_uses_its_own(model_dir: Path, arc_files: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """BLoB's 10 draws, K for the ibdr mixture (the paper preset learns σ), one pass for a point mass."""
    output = tmp_path / "out"
    args = ["--model", str(model_dir), "--train-file", str(arc_files[0]), "--test-file", str(arc_files[1]),
            "--output", str(output), "--tasks", "arc_easy", "--methods", "map,ibdr,blob", "--no-zero-shot",
            *SMALL[:SMALL.index("--num-samples")], *SMALL[SMALL.index("--num-samples") + 2:]]
    result = CliRunner().invoke(commonsense.main, args)
    assert result.exit_code == 0, result.output
    samples = {m: json.loads((output / "runs" / f"arc_easy__{m}__seed0.json").read_text())["cost"]["test_samples"]
               for m in ("map", "ibdr", "blob")}
    assert samples == {"map": 1, "ibdr": 2, "blob": 10}


@pytest.mark.parametrize(("method", "samples"), [("mle", 1), ("fft", 1), ("laplace", 2), ("ivon", 2), ("pvera", 2)])
def test_each_new_baseline_runs_from_the_cli(model_dir: Path, arc_files: tuple[Path, Path], tmp_path: Path,
                                              method: str, samples: int) -> None:
    output = tmp_path / "out"
    result = _invoke(model_dir, *arc_files, output, "--tasks", "arc_easy", "--methods", method)
    assert result.exit_code == 0, result.output
    record = json.loads((output / "runs" / f"arc_easy__{method}__seed0.json").read_text())
    metrics, cost = record["metrics"], record["cost"]
    assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["ece"] <= 1 and metrics["nll"] > 0
    assert (cost["steps"], cost["passes_per_step"], cost["test_samples"]) == (3, 1, samples)
    full = sum(p.numel() for p in tiny_lm(len(make_tokenizer())).parameters())
    pvera = 2 * ((32 + 2 * 8) + (16 + 2 * 8))  # λ_b (out) and λ_d (2r) on q (32 -> 32) and v (32 -> 16), 2 layers
    assert cost["trainable_parameters"] == {"fft": full, "pvera": pvera}.get(method, LORA_SIZE)
    if method == "laplace":
        assert record["state"]["prior_precision"] != [1.0] and record["state"]["log_marglik"] is not None
