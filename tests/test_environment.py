"""--device auto and the environment a results file records."""

import pytest
import torch

from pyro_ibdr.experiments.environment import resolve_device, run_environment


def test_auto_is_the_gpu_when_one_is_present(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"'cuda:3' asked for, but only 1 CUDA GPU\(s\) exist"):
        resolve_device("cuda:3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU is visible; use --device cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_the_environment_names_device_threads_and_versions() -> None:
    environment = run_environment("cpu")
    assert environment["device"] == "cpu" and environment["device_name"]
    assert environment["threads"] == torch.get_num_threads()
    assert {"pyro_ibdr", "torch", "pyro", "peft", "python"} <= set(environment["versions"])
    assert torch.__version__.startswith(environment["versions"]["torch"])  # the distribution: no +cu130 suffix
