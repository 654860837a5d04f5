"""Checkpoints round-trip posteriors exactly, fail loudly on damage or mismatch; adapters export to peft."""

import json

import peft
import pytest
import torch

from pyro_ibdr import BayesianLoRA, lora_only, predictive_probs
from pyro_ibdr.checkpoint import (
    check_compatible,
    export_particles,
    export_peft_adapter,
    load_checkpoint,
    save_checkpoint,
)
from pyro_ibdr.io import atomic_write, write_csv, write_json
from pyro_ibdr.posterior import EmpiricalPosterior, GaussianPosterior, ParticlePosterior
from pyro_ibdr.train import fit
from tests._dummies.data import digits
from tests._dummies.nets import TinyMLP, lora_mlp


@pytest.fixture
def model():
    return BayesianLoRA(lora_mlp(seed=0, rank=4).eval(), num_data=100)


def trained_particles(model, k=3, seed=1):
    """LoRA initialisations moved off B = 0, so every particle is a different function."""
    generator = torch.Generator().manual_seed(seed)
    return model.init_particles(k, generator) + 0.1 * torch.randn(k, model.dim, generator=generator)


def posteriors(model):
    particles = trained_particles(model)
    return [
        ParticlePosterior(particles, 0.01),
        GaussianPosterior(particles[0], torch.full((model.dim,), 0.02)),
        EmpiricalPosterior(particles),
    ]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_save_load_gives_identical_predictions(tmp_path, model, index):
    posterior = posteriors(model)[index]
    path = save_checkpoint(tmp_path / "run.pt", posterior, spec=model.spec, method="ibdr",
                           config={"lr": 0.02, "targets": ["fc1", "fc2"], "rank": 4}, seed=7, state={"lambda": 2.5})
    loaded = load_checkpoint(path)
    x = torch.rand(9, 64)
    draws = lambda p: p.sample(3, generator=torch.Generator().manual_seed(0))  # noqa: E731
    assert torch.equal(draws(loaded.posterior)["theta"], draws(posterior)["theta"])
    expected = predictive_probs(model, draws(posterior), x)
    assert torch.equal(predictive_probs(model, draws(loaded.posterior), x), expected)
    assert type(loaded.posterior) is type(posterior)
    assert (loaded.method, loaded.seed, loaded.state) == ("ibdr", 7, {"lambda": 2.5})
    assert loaded.config == {"lr": 0.02, "targets": ["fc1", "fc2"], "rank": 4}
    assert loaded.spec == model.spec
    assert set(loaded.versions) == {"pyro_ibdr", "torch", "pyro", "peft", "transformers", "timm", "torchvision"}
    assert loaded.versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    check_compatible(loaded, model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temporary files left


def test_a_fitted_ibdr_run_round_trips_with_lambda(tmp_path):
    x, y, _, _ = digits(n_train=64)
    model = BayesianLoRA(lora_mlp().eval(), num_data=len(y))
    result = fit("ibdr", model, [(x[:32], y[:32]), (x[32:], y[32:])], steps=3, progress=False, num_particles=2)
    save_checkpoint(tmp_path / "ibdr.pt", result.posterior, spec=model.spec, method=result.method,
                    config={"steps": 3}, seed=0, state=result.state)
    loaded = load_checkpoint(tmp_path / "ibdr.pt")
    assert loaded.state["lambda"] == result.state["lambda"]
    assert loaded.state["settings"]["lambda_bounds"] == result.state["settings"]["lambda_bounds"]
    assert torch.equal(loaded.posterior.particles, result.posterior.particles)


def test_a_truncated_or_corrupted_file_gives_a_clear_error(tmp_path, model):
    path = save_checkpoint(tmp_path / "run.pt", posteriors(model)[0], spec=model.spec, method="ibdr", config={},
                           seed=0)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a pyro_ibdr checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_mismatched_model_gives_a_clear_error(tmp_path, model):
    save_checkpoint(tmp_path / "run.pt", posteriors(model)[0], spec=model.spec, method="ibdr", config={}, seed=0)
    loaded = load_checkpoint(tmp_path / "run.pt")
    wider = BayesianLoRA(lora_mlp(rank=8).eval(), num_data=100)
    with pytest.raises(ValueError, match=r"lora_A\.default\.weight: checkpoint \(4, 64\) vs model \(8, 64\)"):
        check_compatible(loaded, wider)
    no_head = BayesianLoRA(lora_mlp(rank=4).eval(), num_data=100, select=lora_only)
    with pytest.raises(ValueError, match=r"missing in the model: .*head"):
        check_compatible(loaded, no_head)


def test_bad_saves_are_rejected_and_leave_nothing_behind(tmp_path, model):
    posterior = posteriors(model)[0]
    with pytest.raises(ValueError, match=r"checkpoint\['config'\]\['net'\] is a TinyMLP"):
        save_checkpoint(tmp_path / "run.pt", posterior, spec=model.spec, method="ibdr", config={"net": TinyMLP()},
                        seed=0)
    other = BayesianLoRA(lora_mlp(rank=8).eval(), num_data=100)
    with pytest.raises(ValueError, match="parameter spec has D"):
        save_checkpoint(tmp_path / "run.pt", posterior, spec=other.spec, method="ibdr", config={}, seed=0)
    assert list(tmp_path.iterdir()) == []


def fresh_base() -> TinyMLP:
    """The frozen base network of ``lora_mlp(seed=0)``, rebuilt from the same seed."""
    torch.manual_seed(0)
    return TinyMLP().eval()


def test_peft_export_loads_with_identical_logits(tmp_path, model):
    theta = trained_particles(model)[1]
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    folder = export_peft_adapter(model, theta, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "adapter_config.json").read_text())["modules_to_save"] == ["head"]
    loaded = peft.PeftModel.from_pretrained(fresh_base(), folder).eval()
    x = torch.rand(7, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.logits(theta, x))
    # The exported head is the particle's, not the base network's.
    head = dict(loaded.named_parameters())["base_model.model.head.modules_to_save.default.weight"]
    assert torch.equal(head, model.spec.unflatten(theta)["base_model.model.head.modules_to_save.default.weight"])
    # The model's own tensors are restored.
    assert all(torch.equal(p, before[n]) for n, p in model.net.named_parameters())
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_export_replaces_an_existing_folder(tmp_path, model):
    thetas = trained_particles(model)
    export_peft_adapter(model, thetas[0], tmp_path / "adapter")
    export_peft_adapter(model, thetas[2], tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(fresh_base(), tmp_path / "adapter").eval()
    x = torch.rand(4, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.logits(thetas[2], x))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    with pytest.raises(ValueError, match="theta must have shape"):
        export_peft_adapter(model, thetas, tmp_path / "bad")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_export_particles_writes_one_adapter_per_particle(tmp_path, model):
    posterior = ParticlePosterior(trained_particles(model, k=3))
    folders = export_particles(model, posterior, tmp_path / "ensemble")
    assert [f.name for f in folders] == ["particle_0", "particle_1", "particle_2"]
    x = torch.rand(5, 64)
    for folder, theta in zip(folders, posterior.particles, strict=True):
        loaded = peft.PeftModel.from_pretrained(fresh_base(), folder).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x), model.logits(theta, x))
    with pytest.raises(TypeError, match="needs a ParticlePosterior"):
        export_particles(model, posteriors(model)[1], tmp_path / "gaussian")


def test_io_writers_are_atomic(tmp_path):
    write_json(tmp_path / "result.json", {"accuracy": 0.9, "method": "ibdr"})
    assert json.loads((tmp_path / "result.json").read_text()) == {"accuracy": 0.9, "method": "ibdr"}
    write_csv(tmp_path / "table.csv", [{"method": "ibdr", "ece": 0.1}, {"method": "map", "nll": 0.5}])
    assert (tmp_path / "table.csv").read_text().splitlines() == ["method,ece,nll", "ibdr,0.1,", "map,,0.5"]
    with pytest.raises(RuntimeError, match="interrupted"), atomic_write(tmp_path / "result.json") as handle:
        handle.write("{partial")
        raise RuntimeError("interrupted")
    assert json.loads((tmp_path / "result.json").read_text())["method"] == "ibdr"  # old content intact
    with pytest.raises(ValueError, match="Out of range float"):
        write_json(tmp_path / "nan.json", {"loss": float("nan")})
    with pytest.raises(ValueError, match="at least one row"):
        write_csv(tmp_path / "empty.csv", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json", "table.csv"]
