"""Objects reused across runs: method instances passed to fit, MC dropout's modes, devices, registries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pyro_ibdr.predictive as predictive
from pyro_ibdr import (
    METHODS,
    BayesianLoRA,
    EmpiricalPosterior,
    ParticlePosterior,
    Posterior,
    create_method,
    evaluate,
    fit,
    load_checkpoint,
    predictive_probs,
    save_checkpoint,
)
from pyro_ibdr.dropout import dropout_mode
from pyro_ibdr.methods import IBDR, SGLDConfig
from pyro_ibdr.methods.sgld import SGLD
from tests._dummies.data import digits
from tests._dummies.nets import lora_mlp, plain_mlp, pvera_mlp

x_train, y_train, _, _ = digits(n_train=64)
BATCHES = [(x_train[i : i + 16], y_train[i : i + 16]) for i in range(0, 64, 16)]
OPTIONS = {"ibdr": {"num_particles": 2}, "ensemble": {"num_particles": 2}, "svgd": {"num_particles": 2},
           "bbb": {"num_samples": 2, "kl_anneal_steps": 5}, "sa_bnn": {"num_samples": 2},
           "sgld": {"burn_in": 1, "thin": 1, "num_samples": 3}, "bayestune": {"selection_steps": 2}}


@pytest.fixture
def model():
    return BayesianLoRA(lora_mlp(dropout=0.1).eval(), num_data=64)


def _assert_same(a: object, b: object) -> None:
    """Equal nested state: tensors and floats close, everything else equal."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for item_a, item_b in zip(a, b, strict=True):
            _assert_same(item_a, item_b)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b)
    elif isinstance(a, float):
        assert a == pytest.approx(b)
    else:
        assert a == b


NETWORKS = {"lora": lambda: lora_mlp(dropout=0.1), "full": plain_mlp, "pvera": pvera_mlp}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_instance_that_stepped_restarts_in_fit(name):
    """Every method: fit(instance that already stepped) == fit(fresh instance); state outside the store included."""
    from pyro_ibdr.methods.base import OptimSettings

    model = BayesianLoRA(NETWORKS[METHODS[name].adapter]().eval(), num_data=64)
    optim = OptimSettings(lr=2e-2)
    used = create_method(name, model, optim=optim, **OPTIONS.get(name, {}))
    for x, y in BATCHES * 2:
        used.step(x, y)
    reused = fit(used, model, BATCHES, steps=3, progress=False, seed=1)
    fresh = fit(create_method(name, model, optim=optim, **OPTIONS.get(name, {})), model, BATCHES, steps=3,
                progress=False, seed=1)
    _assert_same(reused.posterior.tensors(), fresh.posterior.tensors())
    timings = {key for key in fresh.state if key.endswith("_s")}  # seconds, e.g. laplace_fit_s
    _assert_same({k: v for k, v in reused.state.items() if k not in timings},
                 {k: v for k, v in fresh.state.items() if k not in timings})
    assert [r["loss"] for r in reused.history] == pytest.approx([r["loss"] for r in fresh.history])


def test_svgd_instance_restarts_from_the_lora_initialisation(model):
    """The issue's instance: a stepped SVGD passed to fit restarted from prior draws N(0, I), 32 away from θ0."""
    svgd = create_method("svgd", model, num_particles=4)
    start = svgd.initial_particles.clone()
    svgd.step(*BATCHES[0])
    result = fit(svgd, model, BATCHES[:1], steps=1, progress=False, optim=None)
    distance = (result.posterior.particles - start).norm(dim=-1)
    assert float(distance.max()) < 1.0  # one step of lr 1e-3 from the LoRA starts (|θ0| ≈ 2.5), not ≈ 32
    torch.testing.assert_close(svgd.initial_particles, start)


def test_sgld_chain_restarts(model):
    sgld = SGLD(model, SGLDConfig(burn_in=0, thin=1, num_samples=5))
    for x, y in BATCHES:
        sgld.step(x, y)
    assert len(sgld.samples) == 4
    result = fit(sgld, model, BATCHES[:2], steps=2, progress=False)
    assert result.posterior.samples.shape[0] == 2 and sgld.num_steps == 2


class _BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.norm = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.norm(torch.relu(self.fc(x)))))


def _bn_model() -> BayesianLoRA:
    import peft

    torch.manual_seed(0)
    net = peft.get_peft_model(_BatchNormNet(), peft.LoraConfig(r=2, target_modules=["fc"], modules_to_save=["head"]))
    return BayesianLoRA(net.eval(), num_data=64)


def test_mc_dropout_switches_only_dropout_modules():
    model = _bn_model()
    norm = model.net.get_submodule("base_model.model.norm")
    running = norm.running_mean.clone()
    seen = []
    norm.register_forward_hook(lambda module, args, out: seen.append(module.training))
    method = create_method("mc_dropout", model)
    method.step(*BATCHES[0])
    posterior = method.posterior()
    probs = predictive_probs(model, posterior, x_train[:8], num_samples=4)
    assert seen and not any(seen)  # BatchNorm stayed in eval mode in training and prediction
    torch.testing.assert_close(norm.running_mean, running)  # the frozen backbone's statistics are unchanged
    assert (probs[0] - probs[1]).abs().max() > 1e-4  # while the dropout masks differ between samples
    assert not any(m.training for m in model.net.modules())  # every mode restored
    drop = model.net.get_submodule("base_model.model.drop")
    with dropout_mode(model.net):
        assert drop.training and not norm.training
    drop.train()
    with dropout_mode(model.net, enabled=False):
        assert drop.training
    assert drop.training


def test_checkpoint_loaded_on_cpu_is_moved_to_the_evaluation_device(model, tmp_path, monkeypatch):
    """No GPU here: evaluate on the "meta" device and record where θ and the inputs arrive."""
    save_checkpoint(tmp_path / "run.pt", ParticlePosterior(model.init_particles(2)), spec=model.spec, method="ibdr",
                    config={}, seed=0)
    checkpoint = load_checkpoint(tmp_path / "run.pt", map_location="cpu")
    arrived = []

    def record(model, x, samples, dropout, *chunks_and_precision):
        arrived.append((x.device.type, samples["theta"].device.type))
        return torch.full((samples["theta"].shape[0], x.shape[0], 10), 0.1)  # uniform: no compute on meta

    monkeypatch.setattr(predictive, "_predict_samples", record)
    metrics = evaluate(model, checkpoint.posterior, BATCHES[:2], num_samples=2, device="meta")
    assert arrived == [("meta", "meta")] * 2
    assert metrics["accuracy"] >= 0  # the metrics were computed from the recorded batches


class _Twin(IBDR):
    """Defines no name: must not replace METHODS['ibdr']."""


def test_subclasses_without_their_own_name_or_kind_do_not_replace_the_parent():
    assert METHODS["ibdr"] is IBDR and METHODS["ibdr"] is not _Twin

    class Frozen(EmpiricalPosterior):
        pass

    assert Posterior.registry["samples"] is EmpiricalPosterior

    with pytest.raises(ValueError, match=r"kind 'samples' is already registered by .*EmpiricalPosterior; give "):
        class Taken(EmpiricalPosterior):
            kind = "samples"

    with pytest.raises(ValueError, match=r"name 'ibdr' is already registered by .*IBDR; give "):
        class Other(IBDR):
            name = "ibdr"

    class Mine(EmpiricalPosterior):
        kind = "test_mine_samples"

    try:
        assert Posterior.registry["test_mine_samples"] is Mine
        state = Mine(torch.zeros(2, 3)).state_dict()
        assert type(Posterior.from_state_dict(state)) is Mine
    finally:
        del Posterior.registry["test_mine_samples"]
    assert Frozen.kind == "samples"
