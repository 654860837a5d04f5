"""Bad inputs of whole kinds, one table row each: (call, expected exception type, fragment of the message that
names the problem). The rows cover the API (constructors, SVI steps, prediction, evaluation, metrics, fit,
checkpoints, peft export), the data readers, both command lines, and interrupted writes (no partial file left).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pyro.infer import SVI

from pyro_ibdr import (
    BayesianLoRA,
    EmpiricalPosterior,
    IBDRLoss,
    IBDRSettings,
    OptimSettings,
    ParticleGuide,
    ParticlePosterior,
    create_method,
    evaluate,
    export_peft_adapter,
    fit,
    load_checkpoint,
    predictive_probs,
    save_checkpoint,
)
from pyro_ibdr import checkpoint as checkpoint_module
from pyro_ibdr.checkpoint import check_compatible, export_particles
from pyro_ibdr.experiments import commonsense as commonsense_cli
from pyro_ibdr.experiments import vtab as vtab_cli
from pyro_ibdr.experiments.data import VTABDataset, read_file_list
from pyro_ibdr.experiments.data.commonsense import format_rows, get_task, load_commonsense, read_rows
from pyro_ibdr.experiments.data.preprocess import ImagePreprocess
from pyro_ibdr.experiments.grid import ResultStore, Unit
from pyro_ibdr.io import atomic_folder, atomic_write, write_csv, write_json
from pyro_ibdr.metrics import classification_metrics, diversity_metrics, ensemble_probs, ood_metrics
from tests._dummies.cli import error_message
from tests._dummies.nets import TinyMLP, lora_mlp

X, Y = torch.rand(8, 64), torch.randint(0, 10, (8,))
NAN = float("nan")


@dataclass
class World:
    """What the rows call into: a model, a posterior, another model, and a folder of good and bad files."""

    model: BayesianLoRA
    other: BayesianLoRA
    posterior: ParticlePosterior
    root: Path

    def svi_step(self, x: Any, y: Any) -> float:
        svi = SVI(self.model, ParticleGuide(self.model, 2), pyro.optim.Adam({"lr": 1e-3}), IBDRLoss())
        return svi.step(x, y)

    def save(self, name: str = "x.pt", posterior: Any = None, model: BayesianLoRA | None = None, **kw: Any) -> Path:
        options = {"method": "ibdr", "config": {}, "seed": 0, **kw}
        return save_checkpoint(self.root / name, self.posterior if posterior is None else posterior,
                               spec=(model or self.model).spec, **options)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("bad_inputs")
    model = BayesianLoRA(lora_mlp().eval(), num_data=64)
    world = World(model, BayesianLoRA(lora_mlp(rank=2).eval(), num_data=64),
                  ParticlePosterior(model.init_particles(2, torch.Generator().manual_seed(0))), root)
    good = world.save("good.pt")
    (root / "text.pt").write_text("not a checkpoint")
    (root / "truncated.pt").write_bytes(good.read_bytes()[:300])
    torch.save({"weights": torch.zeros(2)}, root / "foreign.pt")
    (root / "a_folder").mkdir()
    task = root / "vtab" / "eurosat"
    (task / "img").mkdir(parents=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(task / "img" / "a.png")
    (root / "vtab" / "svhn").mkdir()  # a task folder without file lists
    (task / "img" / "broken.png").write_text("not an image")
    Image.new("F", (4, 4), 0.5).save(task / "img" / "float.tif")
    (task / "test.txt").write_text("img/a.png 0\nimg/broken.png 1\nimg/gone.png 2\nimg/float.tif 3\n")
    (task / "val200.txt").write_text("img/a.png 10\n")
    (task / "train800.txt").write_text("img/a.png -1\n")
    (task / "train800val200.txt").write_bytes("img/caf\xe9.png 1\n".encode("latin-1"))
    arc = {"question": "q", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}, "answerKey": "E"}
    (root / "arc_bad_key.jsonl").write_text(json.dumps(arc) + "\n")
    (root / "arc_no_choices.jsonl").write_text('{"question": "q", "answerKey": "A"}\n')
    (root / "rows_list.jsonl").write_text("[1, 2]\n")
    (root / "rows_broken.jsonl").write_text('{"question": \n')
    (root / "rows.csv").write_text("question,answer\n")
    return world


def _export_plain_network(folder: Path) -> Path:
    plain = BayesianLoRA(TinyMLP(), 10)  # every tensor trainable, no peft wrapper
    return export_peft_adapter(plain, plain.theta0, folder)


Call = Callable[[World], Any]
# (id, call, exception type, fragment of the message)
API: list[tuple[str, Call, type[Exception], str]] = [
    # BayesianLoRA
    ("model-net-not-module", lambda w: BayesianLoRA(lambda x: x, 10), TypeError, "net must be a torch.nn.Module"),
    ("model-num-data-zero", lambda w: BayesianLoRA(w.model.net, 0), ValueError, "num_data must be >= 1"),
    ("model-num-data-float", lambda w: BayesianLoRA(w.model.net, 10.5), TypeError, "num_data must be a positive"),
    ("model-num-data-bool", lambda w: BayesianLoRA(w.model.net, True), TypeError, "num_data must be a positive"),
    ("model-num-data-str", lambda w: BayesianLoRA(w.model.net, "100"), TypeError, "num_data must be a positive"),
    ("model-prior-zero", lambda w: BayesianLoRA(w.model.net, 10, prior_scale=0.0), ValueError, "prior_scale must be"),
    ("model-prior-nan", lambda w: BayesianLoRA(w.model.net, 10, prior_scale=NAN), ValueError, "prior_scale must be"),
    ("model-prior-str", lambda w: BayesianLoRA(w.model.net, 10, prior_scale="1"), TypeError, "prior_scale must be"),
    ("model-vectorize", lambda w: BayesianLoRA(w.model.net, 10, vectorize="yes"), ValueError, "vectorize must be"),
    ("model-no-adapters", lambda w: BayesianLoRA(TinyMLP().requires_grad_(False), 10), ValueError, "peft"),
    # ParticleGuide
    ("guide-model-not-bayesian", lambda w: ParticleGuide(w.model.net, 2), TypeError, "model must be a BayesianLoRA"),
    ("guide-k-zero", lambda w: ParticleGuide(w.model, 0), ValueError, "num_particles must be >= 1"),
    ("guide-k-float", lambda w: ParticleGuide(w.model, 2.5), TypeError, "num_particles must be a positive integer"),
    ("guide-sigma-negative", lambda w: ParticleGuide(w.model, 2, sigma=-0.1), ValueError, "sigma must be >= 0"),
    ("guide-sigma-nan", lambda w: ParticleGuide(w.model, 2, sigma=NAN), ValueError, "sigma must be a number"),
    ("guide-learn-zero-sigma", lambda w: ParticleGuide(w.model, 2, learn_sigma=True), ValueError, "positive initial"),
    ("guide-init-shape", lambda w: ParticleGuide(w.model, 2, init_loc=torch.zeros(3, w.model.dim)), ValueError,
     "init_loc must have shape (2, 970)"),
    ("guide-init-nan", lambda w: ParticleGuide(w.model, 2, init_loc=torch.full((2, w.model.dim), NAN)), ValueError,
     "init_loc must be a tensor of finite"),
    ("guide-init-int", lambda w: ParticleGuide(w.model, 2, init_loc=torch.zeros(2, w.model.dim, dtype=torch.long)),
     ValueError, "dtype torch.int64"),
    # IBDRLoss / IBDRSettings
    ("loss-unknown-option", lambda w: IBDRLoss(alfa=0.1), TypeError, "alfa"),
    ("loss-alpha-str", lambda w: IBDRLoss(alpha="0.1"), TypeError, "IBDRSettings.alpha must be a number"),
    ("loss-alpha-negative", lambda w: IBDRLoss(alpha=-1.0), ValueError, "alpha must be >= 0"),
    ("loss-rho-nan", lambda w: IBDRLoss(rho=NAN), ValueError, "IBDRSettings.rho must be a number (not NaN)"),
    ("loss-dual-lr-negative", lambda w: IBDRLoss(dual_lr=-1.0), ValueError, "dual_lr must be >= 0"),
    ("loss-lambda-bounds", lambda w: IBDRLoss(lambda_bounds=(5.0, 1.0)), ValueError, "lambda_bounds"),
    ("loss-choice", lambda w: IBDRLoss(ascent="steepest"), ValueError, "ascent must be one of"),
    ("loss-settings-dict", lambda w: IBDRLoss({"alpha": 1.0}), TypeError, "settings must be an IBDRSettings"),
    ("settings-clip-zero", lambda w: IBDRSettings(clip_norm=0.0), ValueError, "clip_norm must be positive"),
    # svi.step with bad batches
    ("svi-labels-2d", lambda w: w.svi_step(X, Y[:, None]), ValueError, "labels have shape (8, 1)"),
    ("svi-labels-float", lambda w: w.svi_step(X, Y.float()), TypeError, "labels must be an integer tensor"),
    ("svi-labels-bool", lambda w: w.svi_step(X, Y > 4), TypeError, "labels must be an integer tensor"),
    ("svi-labels-list", lambda w: w.svi_step(X, Y.tolist()), TypeError, "labels must be an integer tensor"),
    ("svi-labels-too-large", lambda w: w.svi_step(X, Y + 10), ValueError, "labels must lie in [0, 10)"),
    ("svi-labels-negative", lambda w: w.svi_step(X, Y - 10), ValueError, "labels must lie in [0, 10)"),
    ("svi-labels-count", lambda w: w.svi_step(X, Y[:5]), ValueError, "inputs hold 8 examples"),
    ("svi-batch-over-num-data", lambda w: w.svi_step(X.repeat(9, 1), Y.repeat(9)), ValueError, "num_data = 64"),
    ("svi-inputs-nan", lambda w: w.svi_step(X * NAN, Y), FloatingPointError, "contain NaN"),
    ("svi-inputs-inf", lambda w: w.svi_step(X * float("inf"), Y), FloatingPointError, "non-finite logits"),
    ("svi-inputs-features", lambda w: w.svi_step(torch.rand(8, 63), Y), RuntimeError, "inputs of shape (8, 63)"),
    ("svi-inputs-dtype", lambda w: w.svi_step(X.double(), Y), RuntimeError, "dtype torch.float64"),
    ("svi-inputs-list", lambda w: w.svi_step(X.tolist(), Y), TypeError, "inputs must be a tensor or a mapping"),
    ("svi-inputs-numpy", lambda w: w.svi_step(X.numpy(), Y), TypeError, "got ndarray"),
    ("svi-inputs-empty", lambda w: w.svi_step(X[:0], Y[:0]), ValueError, "the batch is empty"),
    ("svi-inputs-mapping-sizes", lambda w: w.svi_step({"a": X, "b": X[:4]}, Y), ValueError, "disagree on the batch"),
    # prediction
    ("predict-other-model", lambda w: predictive_probs(w.other, w.posterior, X), ValueError, "(S, D = 650)"),
    ("predict-no-theta", lambda w: predictive_probs(w.model, {"th": w.posterior.particles}, X), KeyError, "'theta'"),
    ("predict-theta-1d", lambda w: predictive_probs(w.model, {"theta": w.posterior.particles[0]}, X), ValueError,
     "got (970,)"),
    ("predict-theta-nan", lambda w: predictive_probs(w.model, {"theta": w.posterior.particles * NAN}, X), ValueError,
     "contain NaN or inf"),
    ("predict-samples-zero", lambda w: predictive_probs(w.model, w.posterior, X, num_samples=0), ValueError,
     "num_samples must be >= 1"),
    ("predict-posterior-str", lambda w: predictive_probs(w.model, "ibdr", X), TypeError,
     "posterior must be a guide, a Posterior or samples"),
    ("predict-precision", lambda w: predictive_probs(w.model, w.posterior, X, precision="fp8"), ValueError,
     "precision must be one of"),
    ("predict-chunk-size", lambda w: predictive_probs(w.model, w.posterior, X, chunk_size=0), ValueError,
     "chunk_size must be a positive"),
    ("posterior-rows-nan", lambda w: EmpiricalPosterior(torch.full((2, 3), NAN)), ValueError, "contains NaN"),
    ("posterior-sigma-negative", lambda w: ParticlePosterior(torch.zeros(2, 3), -1.0), ValueError, "sigma must be"),
    # evaluate
    ("evaluate-empty-loader", lambda w: evaluate(w.model, w.posterior, []), ValueError, "yielded no batches"),
    ("evaluate-not-pairs", lambda w: evaluate(w.model, w.posterior, [X]), ValueError,
     "batches must be (inputs, labels) pairs, got a Tensor"),
    ("evaluate-triples", lambda w: evaluate(w.model, w.posterior, [(X, Y, Y)]), ValueError, "got a tuple of 3"),
    ("evaluate-labels-list", lambda w: evaluate(w.model, w.posterior, [(X, Y.tolist())]), TypeError,
     "labels of a batch must be a tensor"),
    ("evaluate-labels-range", lambda w: evaluate(w.model, w.posterior, [(X, Y + 10)]), ValueError,
     "targets must lie in [0, 10)"),
    ("evaluate-posterior-dict", lambda w: evaluate(w.model, {"theta": w.posterior.particles}, [(X, Y)]), TypeError,
     "posterior must be a Posterior"),
    ("evaluate-other-model", lambda w: evaluate(w.other, w.posterior, [(X, Y)]), ValueError, "another model"),
    ("evaluate-ensemble", lambda w: evaluate(w.model, w.posterior, [(X, Y)], ensemble="median"), ValueError,
     "'mean_probs' or 'mean_logits'"),
    ("evaluate-bins", lambda w: evaluate(w.model, w.posterior, [(X, Y)], n_bins=0), ValueError, "n_bins must be"),
    ("evaluate-device", lambda w: evaluate(w.model, w.posterior, [(X, Y)], device="gpu"), RuntimeError, "gpu"),
    # metrics
    ("metrics-targets-count", lambda w: classification_metrics(torch.full((8, 10), 0.1), Y[:4]), ValueError,
     "targets has 4 entries"),
    ("metrics-logits", lambda w: classification_metrics(torch.randn(8, 10), Y), ValueError, "not logits"),
    ("metrics-not-normalised", lambda w: classification_metrics(torch.rand(8, 10), Y), ValueError, "sum to 1"),
    ("metrics-targets-float", lambda w: classification_metrics(torch.full((8, 10), 0.1), Y.float()), ValueError,
     "integer class indices"),
    ("metrics-probs-nan", lambda w: classification_metrics(torch.full((8, 10), NAN), Y), ValueError, "NaN"),
    ("metrics-ood-empty", lambda w: ood_metrics(torch.rand(3), torch.rand(0)), ValueError, "non-empty 1-D"),
    ("metrics-ensemble-mode", lambda w: ensemble_probs(torch.full((2, 8, 10), 0.1), "vote"), ValueError,
     "mode must be"),
    ("metrics-diversity-2d", lambda w: diversity_metrics(torch.full((8, 10), 0.1), Y), ValueError, "(S, B, C)"),
    # fit options
    ("fit-epochs-zero", lambda w: fit("map", w.model, [(X, Y)], epochs=0), ValueError, "epochs must be a positive"),
    ("fit-epochs-and-steps", lambda w: fit("map", w.model, [(X, Y)], epochs=1, steps=1), ValueError, "exactly one"),
    ("fit-steps-float", lambda w: fit("map", w.model, [(X, Y)], steps=1.5), ValueError, "steps must be a positive"),
    ("fit-unknown-method", lambda w: fit("mapp", w.model, [(X, Y)], steps=1), ValueError, "unknown method 'mapp'"),
    ("fit-method-int", lambda w: fit(3, w.model, [(X, Y)], steps=1), TypeError, "method must be a Method"),
    ("fit-unknown-option", lambda w: fit("map", w.model, [(X, Y)], steps=1, num_particles=2), TypeError,
     "MAPConfig has no option(s) ['num_particles']"),
    ("fit-option-type", lambda w: fit("ibdr", w.model, [(X, Y)], steps=1, num_particles="4"), TypeError,
     "IBDRConfig.num_particles must be int, got '4'"),
    ("fit-option-choice", lambda w: fit("svgd", w.model, [(X, Y)], steps=1, kernel="gauss"), ValueError,
     "kernel must be one of"),
    ("fit-svgd-one-particle", lambda w: fit("svgd", w.model, [(X, Y)], steps=1, num_particles=1), ValueError,
     "at least 2 particles"),
    ("fit-sgld-thin", lambda w: fit("sgld", w.model, [(X, Y)], steps=1, thin=0), ValueError, "thin >= 1"),
    ("fit-bbb-scale", lambda w: fit("bbb", w.model, [(X, Y)], steps=1, init_scale=-1.0), ValueError, "init_scale"),
    ("fit-schedule", lambda w: fit("map", w.model, [(X, Y)], steps=1, schedule="cosine"), ValueError,
     "unknown schedule 'cosine'"),
    ("fit-lr-negative", lambda w: fit("map", w.model, [(X, Y)], steps=1, optim=OptimSettings(lr=-1)), ValueError,
     "lr must be positive"),
    ("fit-lr-nan", lambda w: OptimSettings(lr=NAN), ValueError, "lr must be a number (not NaN)"),
    ("fit-momentum", lambda w: OptimSettings(momentum=1.5), ValueError, "momentum < 1"),
    ("fit-optimizer", lambda w: OptimSettings(optimizer="rmsprop"), ValueError, "optimizer must be"),
    ("fit-optim-dict", lambda w: fit("map", w.model, [(X, Y)], steps=1, optim={"lr": 0.1}), TypeError,
     "optim must be an OptimSettings"),
    ("fit-model-not-bayesian", lambda w: fit("map", w.model.net, [(X, Y)], steps=1), TypeError,
     "model must be a BayesianLoRA"),
    ("fit-empty-loader", lambda w: fit("map", w.model, [], epochs=1), ValueError, "training loader is empty"),
    ("fit-generator", lambda w: fit("map", w.model, iter([(X, Y)]), steps=2), ValueError, "re-iterable"),
    ("fit-not-pairs", lambda w: fit("map", w.model, [X], steps=1), ValueError, "(inputs, labels) pairs"),
    ("fit-callback", lambda w: fit("map", w.model, [(X, Y)], steps=1, callbacks=[1]), TypeError,
     "callbacks must be callables"),
    ("fit-method-other-model", lambda w: fit(create_method("map", w.other), w.model, [(X, Y)], steps=1), ValueError,
     "different model"),
    ("fit-mc-dropout-no-dropout", lambda w: fit("mc_dropout", w.model, [(X, Y)], steps=1), ValueError,
     "needs a network with a dropout module"),
    ("fit-batch-over-num-data", lambda w: fit("map", BayesianLoRA(w.model.net, 4), [(X, Y)], steps=1), ValueError,
     "larger than num_data = 4"),
    ("fit-unknown-preset", lambda w: fit("ibdr", w.model, [(X, Y)], steps=1, preset="authors"), ValueError,
     "unknown preset 'authors'"),
    ("fit-ivon-ess", lambda w: fit("ivon", w.model, [(X, Y)], steps=1, ess=-1.0), ValueError, "ess must be positive"),
    ("fit-ivon-hess-str", lambda w: fit("ivon", w.model, [(X, Y)], steps=1, hess_init="1"), TypeError,
     "IVONConfig.hess_init must be a number"),
    ("fit-laplace-hessian", lambda w: fit("laplace", w.model, [(X, Y)], steps=1, hessian_structure="full"), ValueError,
     "hessian_structure must be"),
    ("fit-fft-on-lora", lambda w: fit("fft", w.model, [(X, Y)], steps=1), ValueError,
     "needs a plain network without LoRA adapters"),
    # checkpoints and export
    ("save-other-spec", lambda w: w.save(model=w.other), ValueError, "parameter spec has D = 650"),
    ("save-posterior-dict", lambda w: w.save(posterior={"theta": 1}), TypeError, "posterior must be a Posterior"),
    ("save-config-object", lambda w: w.save(config={"f": object()}), ValueError, "checkpoint['config']['f']"),
    ("save-seed-str", lambda w: w.save(seed="a"), TypeError, "seed must be an int"),
    ("save-onto-folder", lambda w: w.save("a_folder"), IsADirectoryError, "a_folder is a folder"),
    ("load-missing", lambda w: load_checkpoint(w.root / "missing.pt"), FileNotFoundError, "missing.pt"),
    ("load-folder", lambda w: load_checkpoint(w.root / "a_folder"), FileNotFoundError, "a_folder"),
    ("load-text-file", lambda w: load_checkpoint(w.root / "text.pt"), ValueError, "not a readable checkpoint"),
    ("load-truncated", lambda w: load_checkpoint(w.root / "truncated.pt"), ValueError, "truncated or corrupted"),
    ("load-foreign", lambda w: load_checkpoint(w.root / "foreign.pt"), ValueError, "not a pyro_ibdr checkpoint"),
    ("load-other-model", lambda w: check_compatible(load_checkpoint(w.root / "good.pt"), w.other), ValueError,
     "does not fit this model (D = 650)"),
    ("export-theta-shape", lambda w: export_peft_adapter(w.model, torch.zeros(3), w.root / "ad"), ValueError,
     "theta must have shape (970,)"),
    ("export-theta-nan", lambda w: export_peft_adapter(w.model, w.posterior.particles[0] * NAN, w.root / "ad"),
     ValueError, "theta contains NaN"),
    ("export-not-peft", lambda w: _export_plain_network(w.root / "ad"), TypeError, "not a peft model"),
    ("export-onto-file", lambda w: export_peft_adapter(w.model, w.posterior.particles[0], w.root / "text.pt"),
     ValueError, "exists and is not a folder"),
    ("export-particles-gaussian", lambda w: export_particles(w.model, EmpiricalPosterior(torch.zeros(1, 970)),
                                                              w.root / "ps"), TypeError, "needs a ParticlePosterior"),
]

DATA: list[tuple[str, Call, type[Exception], str]] = [
    ("vtab-missing-root", lambda w: VTABDataset(w.root / "nowhere", "eurosat", "test"), FileNotFoundError,
     "nowhere (that VTAB data folder does not exist)"),
    ("vtab-missing-task-folder", lambda w: VTABDataset(w.root / "vtab", "dtd", "test"), FileNotFoundError,
     "no folder for task 'dtd'"),
    ("vtab-unknown-task", lambda w: VTABDataset(w.root / "vtab", "imagenet", "test"), ValueError,
     "unknown VTAB task 'imagenet'"),
    ("vtab-unknown-split", lambda w: VTABDataset(w.root / "vtab", "eurosat", "training"), ValueError, "split must be"),
    ("vtab-missing-list", lambda w: VTABDataset(w.root / "vtab", "svhn", "test"), FileNotFoundError,
     "file list not found"),
    ("vtab-label-too-large", lambda w: VTABDataset(w.root / "vtab", "eurosat", "val200"), ValueError,
     "labels must be < 10"),
    ("vtab-label-negative", lambda w: VTABDataset(w.root / "vtab", "eurosat", "train800"), ValueError,
     "train800.txt:1: negative label -1"),
    ("vtab-list-latin1", lambda w: VTABDataset(w.root / "vtab", "eurosat", "train800val200"), ValueError,
     "train800val200.txt:1: bytes b'\\xe9' are not valid UTF-8"),
    ("vtab-image-undecodable", lambda w: VTABDataset(w.root / "vtab", "eurosat", "test")[1], ValueError,
     "cannot decode image"),
    ("vtab-image-missing", lambda w: VTABDataset(w.root / "vtab", "eurosat", "test")[2], FileNotFoundError,
     "gone.png"),
    ("vtab-image-float-mode", lambda w: VTABDataset(w.root / "vtab", "eurosat", "test")[3], ValueError,
     "image mode 'F'"),
    ("vtab-img-size", lambda w: ImagePreprocess(input_size=(3, 0, 0)), ValueError,
     "input_size must be (3, H, W) with H, W >= 1"),
    ("vtab-list-missing-file", lambda w: read_file_list(w.root / "none.txt"), FileNotFoundError, "none.txt"),
    ("commonsense-unknown-task", lambda w: get_task("hellaswag"), ValueError, "unknown commonsense dataset"),
    ("commonsense-unknown-source", lambda w: load_commonsense("arc_easy", source="web"), ValueError,
     "unknown source 'web'"),
    ("commonsense-row-layout", lambda w: format_rows("arc_easy", read_rows(w.root / "arc_no_choices.jsonl")),
     ValueError, "arc_easy row 0 does not have the raw HF field layout"),
    ("commonsense-answer-key", lambda w: format_rows("arc_easy", read_rows(w.root / "arc_bad_key.jsonl")),
     ValueError, "answer key 'E' is not one of the choice keys"),
    ("commonsense-row-not-object", lambda w: read_rows(w.root / "rows_list.jsonl"), ValueError,
     "rows_list.jsonl:1 is a JSON list, not an object"),
    ("commonsense-row-broken-json", lambda w: read_rows(w.root / "rows_broken.jsonl"), ValueError,
     "rows_broken.jsonl:1 is not one JSON object per line"),
    ("commonsense-file-type", lambda w: read_rows(w.root / "rows.csv"), ValueError, "unsupported data file"),
    ("commonsense-file-missing", lambda w: read_rows(w.root / "none.jsonl"), FileNotFoundError, "none.jsonl"),
    ("commonsense-winogrande-answer",
     lambda w: format_rows("winogrande_s", [{"sentence": "s", "option1": "a", "option2": "b", "answer": "3"}]),
     ValueError, "winogrande answer must be '1' or '2'"),
    ("commonsense-boolq-answer",
     lambda w: format_rows("boolq", [{"question": "q", "passage": "p", "answer": "yes"}]), ValueError,
     "boolq answer must be a bool"),
]


@pytest.mark.parametrize(("call", "error", "fragment"), [row[1:] for row in API + DATA],
                         ids=[row[0] for row in API + DATA])
def test_api_and_data(world: World, call: Call, error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        call(world)
    assert fragment in str(info.value)


# (id, command, arguments after the defaults, fragment of what the user sees)
VTAB_ARGS = ["--task", "eurosat", "--model", "test_vit", "--epochs", "1", "--threads", "1"]
COMMONSENSE_FILES = ["--source", "files", "--tasks", "arc_easy"]
CLI: list[tuple[str, Any, list[str], str]] = [
    ("vtab-unknown-method", vtab_cli.main, ["--methods", "map,foo"], "unknown methods ['foo']"),
    ("vtab-no-method", vtab_cli.main, ["--methods", " , "], "needs at least one comma-separated name"),
    ("vtab-unknown-task", vtab_cli.main, ["--task", "imagenet", "--random-init"], "no task folder 'imagenet'"),
    ("vtab-task-folder-missing", vtab_cli.main, ["--task", "dtd", "--random-init"], "no folder for task 'dtd'"),
    ("vtab-particles-zero", vtab_cli.main, ["--particles", "0"], "--particles"),
    ("vtab-epochs-word", vtab_cli.main, ["--epochs", "ten"], "'ten' is not a valid integer"),
    ("vtab-lr-negative", vtab_cli.main, ["--lr", "-1"], "--lr"),
    ("vtab-lr-nan", vtab_cli.main, ["--lr", "nan"], "'nan' is not a finite number"),
    ("vtab-batch-size-zero", vtab_cli.main, ["--batch-size", "0"], "--batch-size"),
    ("vtab-img-size-zero", vtab_cli.main, ["--img-size", "0"], "--img-size"),
    ("vtab-rank-zero", vtab_cli.main, ["--rank", "0"], "--rank"),
    ("vtab-lora-alpha-zero", vtab_cli.main, ["--lora-alpha", "0"], "--lora-alpha"),
    ("vtab-sigma-negative", vtab_cli.main, ["--sigma", "-0.1"], "--sigma"),
    ("vtab-alpha-inf", vtab_cli.main, ["--alpha", "inf"], "'inf' is not a finite number"),
    ("vtab-rho-negative", vtab_cli.main, ["--rho", "-1"], "--rho"),
    ("vtab-threads-zero", vtab_cli.main, ["--threads", "0"], "--threads"),
    ("vtab-seed-negative", vtab_cli.main, ["--seed", "-1"], "--seed"),
    ("vtab-lora-dropout-one", vtab_cli.main, ["--lora-dropout", "1"], "--lora-dropout"),
    ("vtab-lora-targets", vtab_cli.main, ["--lora-targets", "qk"], "'qk' is not one of 'qv', 'qkv'"),
    ("vtab-device", vtab_cli.main, ["--device", "gpu"], "unknown device 'gpu'"),
    ("vtab-preset", vtab_cli.main, ["--preset", "authors"], "'authors' is not one of 'official', 'paper'"),
    ("vtab-checkpoint-missing", vtab_cli.main, ["--checkpoint", "missing.npz"], "'missing.npz' does not exist"),
    ("vtab-max-test-zero", vtab_cli.main, ["--max-test", "0"], "--max-test"),
    ("vtab-warmup-negative", vtab_cli.main, ["--warmup-steps", "-1"], "--warmup-steps"),
    ("vtab-precision", vtab_cli.main, ["--precision", "fp8"], "'fp8' is not one of"),
    ("vtab-unknown-option", vtab_cli.main, ["--particle", "2"], "Did you mean '--particles'?"),
    ("commonsense-unknown-method", commonsense_cli.main, ["--methods", "foo"], "unknown methods ['foo']"),
    ("commonsense-unknown-task", commonsense_cli.main, ["--tasks", "hellaswag"], "unknown commonsense dataset"),
    ("commonsense-source", commonsense_cli.main, ["--source", "web"], "'web' is not one of"),
    ("commonsense-files-missing-options", commonsense_cli.main, ["--source", "files"],
     "--source files needs --train-file and --test-file"),
    ("commonsense-train-file-missing", commonsense_cli.main, ["--train-file", "none.jsonl"], "does not exist"),
    ("commonsense-files-two-tasks", commonsense_cli.main,
     ["--source", "files", "--tasks", "arc_easy,boolq", "--train-file", "{root}/arc_bad_key.jsonl",
      "--test-file", "{root}/arc_bad_key.jsonl"], "reads one task"),
    ("commonsense-files-bad-rows", commonsense_cli.main,
     [*COMMONSENSE_FILES, "--train-file", "{root}/arc_no_choices.jsonl", "--test-file", "{root}/arc_bad_key.jsonl"],
     "arc_easy row 0 does not have the raw HF field layout"),
    ("commonsense-files-answer-key", commonsense_cli.main,
     [*COMMONSENSE_FILES, "--train-file", "{root}/arc_bad_key.jsonl", "--test-file", "{root}/arc_bad_key.jsonl"],
     "answer key 'E'"),
    ("commonsense-particles-zero", commonsense_cli.main, ["--particles", "0"], "--particles"),
    ("commonsense-steps-zero", commonsense_cli.main, ["--steps", "0"], "--steps"),
    ("commonsense-lr-nan", commonsense_cli.main, ["--lr", "nan"], "'nan' is not a finite number"),
    ("commonsense-batch-size-zero", commonsense_cli.main, ["--batch-size", "0"], "--batch-size"),
    ("commonsense-max-length-zero", commonsense_cli.main, ["--max-length", "0"], "--max-length"),
    ("commonsense-rank-zero", commonsense_cli.main, ["--rank", "0"], "--rank"),
    ("commonsense-num-samples-zero", commonsense_cli.main, ["--num-samples", "0"], "--num-samples"),
    ("commonsense-max-test-negative", commonsense_cli.main, ["--max-test", "-1"], "--max-test"),
    ("commonsense-alpha-negative", commonsense_cli.main, ["--alpha", "-0.5"], "--alpha"),
    ("commonsense-seed-huge", commonsense_cli.main, ["--seed", str(2**33)], "--seed"),
    ("commonsense-preset", commonsense_cli.main, ["--preset", "authors"], "'authors' is not one of"),
]


@pytest.mark.parametrize(("command", "args", "fragment"), [row[1:] for row in CLI], ids=[row[0] for row in CLI])
def test_command_lines(world: World, tmp_path: Path, command: Any, args: list[str], fragment: str) -> None:
    """Every row stops before any weights are built or training starts (no network, no assets)."""
    args = [a.replace("{root}", str(world.root)) for a in args]
    if command is vtab_cli.main:
        args = ["--data-dir", str(world.root / "vtab"), *VTAB_ARGS, *args]
    result = CliRunner().invoke(command, [*args, "--output", str(tmp_path / "out")])
    message = error_message(result)
    assert fragment in message, message
    assert not (tmp_path / "out").exists()  # nothing written


# ------------------------------------------------------------------------------------- interrupted writes
class Interrupt(Exception):
    """Raised in the middle of a write."""


def _interrupting_torch_save(obj: Any, handle: Any, *args: Any, **kwargs: Any) -> None:
    handle.write(b"PK\x03\x04 half a zip archive")
    raise Interrupt


def _csv_row_that_fails() -> list[dict[str, Any]]:
    class Exploding:
        def __str__(self) -> str:
            raise Interrupt

    return [{"a": 1, "b": 2}] * 50 + [{"a": Exploding(), "b": 3}]


def _failing_save_pretrained(folder: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "adapter_config.json").write_text("{")
    raise Interrupt


# (id, what the target is, write(world, target) that is interrupted, expected exception)
WRITES: list[tuple[str, str, Callable[[World, Path], Any], type[BaseException]]] = [
    ("atomic-write-text", "file", lambda w, p: _write_then_fail(p), Interrupt),
    ("atomic-write-binary", "file", lambda w, p: _write_then_fail(p, "wb"), Interrupt),
    ("atomic-write-ctrl-c", "file", lambda w, p: _write_then_fail(p, error=KeyboardInterrupt), KeyboardInterrupt),
    ("write-json-nan", "file", lambda w, p: write_json(p, {"accuracy": NAN}), ValueError),
    ("write-json-object", "file", lambda w, p: write_json(p, {"run": object()}), TypeError),
    ("write-csv-row", "file", lambda w, p: write_csv(p, _csv_row_that_fails()), Interrupt),
    ("result-store-nan", "file",
     lambda w, p: ResultStore(p.parent.parent).save(Unit("t", "map", 0), {"ece": NAN}, {}), ValueError),
    ("checkpoint-torch-save", "file", lambda w, p: w.save(p.name), Interrupt),
    ("checkpoint-bad-state", "file", lambda w, p: w.save(p.name, state={"fn": print}), ValueError),
    ("export-adapter", "folder", lambda w, p: export_peft_adapter(w.model, w.posterior.particles[0], p), Interrupt),
    ("export-particles", "folder", lambda w, p: export_particles(w.model, w.posterior, p), Interrupt),
    ("atomic-folder", "folder", lambda w, p: _fill_folder_then_fail(p), Interrupt),
]


def _write_then_fail(path: Path, mode: str = "w", error: type[BaseException] = Interrupt) -> None:
    with atomic_write(path, mode) as handle:
        handle.write("partial " * 1000 if mode == "w" else b"partial" * 1000)
        raise error


def _fill_folder_then_fail(path: Path) -> None:
    with atomic_folder(path) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise Interrupt


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-existing"])
@pytest.mark.parametrize(("kind", "write", "error"), [row[1:] for row in WRITES], ids=[row[0] for row in WRITES])
def test_interrupted_writes_leave_no_partial_file(world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  kind: str, write: Callable[[World, Path], Any],
                                                  error: type[BaseException], existing: bool) -> None:
    """The target is either absent (new) or exactly the old one (over-existing), and no temporary is left."""
    monkeypatch.setattr(world, "root", tmp_path)
    monkeypatch.setattr(checkpoint_module.torch, "save", _interrupting_torch_save)
    monkeypatch.setattr(world.model.net, "save_pretrained", _failing_save_pretrained)
    path = tmp_path / "runs" / "t__map__seed0.json"  # the result store's name for Unit("t", "map", 0)
    before = {k: v.clone() for k, v in world.model.net.state_dict().items()}
    if existing:
        path.parent.mkdir(parents=True)
        if kind == "folder":
            path.mkdir()
            (path / "old.txt").write_text("old")
        else:
            path.write_text("old")
    with pytest.raises(error):
        write(world, path)
    siblings = sorted(p.name for p in path.parent.iterdir()) if path.parent.exists() else []
    assert siblings == ([path.name] if existing else []), siblings  # no temporary file or folder left
    if existing:
        assert (path / "old.txt" if kind == "folder" else path).read_text() == "old"
        assert kind == "file" or [p.name for p in path.iterdir()] == ["old.txt"]
    for name, value in world.model.net.state_dict().items():  # an export restores the model's own tensors
        torch.testing.assert_close(value, before[name])
