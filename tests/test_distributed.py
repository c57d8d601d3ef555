"""Data-parallel training on real gloo process groups: 2 CPU processes against 1.

One group of two processes (this one is rank 0, one helper process joins it over a
TCPStore on a port the OS picks) serves every test of the module, so the helper's start-up
is paid once. Each test trains the same job single-process and on both ranks and checks:

* the loss of every step equals the single-process loss within LOSS_TOL, and the eval
  losses within EVAL_TOL (the ranks sum partial token sums in a different order);
* the exported adapter is the same tensor by tensor within ADAPTER_TOL;
* quantum jobs = ceil(steps / update_every), the same count as single-process, although
  two processes trained (rank 0 alone runs the circuit and broadcasts p);
* only rank 0 wrote outputs (every step appears once in events.jsonl).

Measured differences on 2 shared cores: loss <= 1.2e-6, adapter <= 1.6e-7 (float32 values up
to 0.4, a few ulps); the tolerances leave a margin of about 8x.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file

from qpa.distributed import LocalGroup
from qpa.errors import ConfigError, JobCancelled
from qpa.training import Trainer, finetune

LOSS_TOL = 1e-5
EVAL_TOL = 1e-6
ADAPTER_TOL = 1e-6


@pytest.fixture(scope="module")
def two_processes():
    with LocalGroup(2, "cpu", trainer=Trainer) as group:
        yield group


def _train(config, output_dir, group=None, **kwargs):
    events: list[dict] = []
    if group is None:
        metrics = finetune(config, output_dir, on_event=events.append, **kwargs)
    else:
        metrics = group.finetune(config, output_dir, on_event=events.append, **kwargs)
    return metrics, [event["loss"] for event in events if event["type"] == "step"]


def _assert_same_adapter(single_dir, multi_dir) -> None:
    single = load_file(single_dir / "adapter" / "adapter_model.safetensors")
    multi = load_file(multi_dir / "adapter" / "adapter_model.safetensors")
    assert single.keys() == multi.keys()
    for key, value in single.items():
        assert multi[key].shape == value.shape
        assert (multi[key] - value).abs().max().item() <= ADAPTER_TOL, key
    assert json.loads((single_dir / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((multi_dir / "adapter" / "adapter_config.json").read_text())


CASES = {
    # method, backend, steps, options: the quantum paths and every registered method.
    "qpa-aer": ("qpa", "aer", 4, {"qpa": {"update_every": 2}}),
    "qpa-ibm-fake": ("qpa", "ibm-fake:FakeManilaV2", 3,
                     {"qpa": {"update_every": 2}, "quantum": {"shots": 1024, "seed": 3}}),
    "qpa-statevector": ("qpa", "statevector", 3, {}),
    "lora": ("lora", "statevector", 3, {}),
    "compound": ("compound", "statevector", 3, {"compound": {"blocks": 2}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_like_one(two_processes, tiny_llama_dir, data_files, tmp_path,
                                      case):
    method, backend, steps, options = CASES[case]
    config = tiny_config(tiny_llama_dir, data_files, method=method, backend=backend,
                         steps=steps, **options)
    single, single_losses = _train(config, tmp_path / "one")
    multi, multi_losses = _train(config, tmp_path / "two", two_processes)

    assert multi["world_size"] == 2 and single["world_size"] == 1
    assert len(multi_losses) == len(single_losses) == steps
    for one, two in zip(single_losses, multi_losses, strict=True):
        assert abs(one - two) <= LOSS_TOL
    for key in ("eval_loss_before", "eval_loss_after"):
        assert abs(single[key] - multi[key]) <= EVAL_TOL
    _assert_same_adapter(tmp_path / "one", tmp_path / "two")
    if config.uses_quantum:
        windows = math.ceil(steps / config.qpa.update_every)
        assert multi["quantum"]["jobs"] == single["quantum"]["jobs"] == windows
        for key in ("circuits", "shots"):
            assert multi["quantum"][key] == single["quantum"][key]
    # Rank 1 trained too, but only rank 0 wrote: each step is logged once.
    logged = [json.loads(line) for line in (tmp_path / "two" / "events.jsonl").open()]
    assert [e["step"] for e in logged if e["type"] == "step"] == list(range(1, steps + 1))


def test_cancel_and_resume_across_world_sizes(two_processes, tiny_llama_dir, data_files,
                                              tmp_path):
    """Cancelled mid-window on two processes, resumed on two or on one: the same result as
    an uninterrupted single-process run. The checkpoint does not depend on the world size."""
    config = tiny_config(tiny_llama_dir, data_files, backend="aer", steps=5,
                         qpa={"update_every": 2}, train={"checkpoint_every": 100})
    reference, reference_losses = _train(config, tmp_path / "straight")

    calls = {"n": 0}

    def stop_before_step_four() -> bool:
        calls["n"] += 1
        return calls["n"] == 4

    with pytest.raises(JobCancelled) as cancelled:
        _train(config, tmp_path / "two", two_processes, should_stop=stop_before_step_four)
    assert cancelled.value.step == 3
    shutil.copytree(tmp_path / "two", tmp_path / "one")

    resumed_two, losses_two = _train(config, tmp_path / "two", two_processes)
    resumed_one, losses_one = _train(config, tmp_path / "one")
    for resumed, losses in ((resumed_two, losses_two), (resumed_one, losses_one)):
        assert len(losses) == 2  # steps 4 and 5
        for one, two in zip(reference_losses[3:], losses, strict=True):
            assert abs(one - two) <= LOSS_TOL
        assert abs(resumed["eval_loss_after"] - reference["eval_loss_after"]) <= EVAL_TOL
        # As in one process, a resume mid-window re-evaluates p at the saved angles once.
        assert resumed["quantum"]["jobs"] == reference["quantum"]["jobs"] + 1 == 4
    _assert_same_adapter(tmp_path / "straight", tmp_path / "two")
    _assert_same_adapter(tmp_path / "straight", tmp_path / "one")


def test_group_rejects_a_batch_it_cannot_split(two_processes, tiny_llama_dir, data_files,
                                               tmp_path):
    config = tiny_config(tiny_llama_dir, data_files, train={"batch_size": 3})
    with pytest.raises(ConfigError) as error:
        two_processes.finetune(config, tmp_path / "odd")
    assert error.value.field == "train.batch_size"


# -- checks that need no second process ---------------------------------------------------


@pytest.mark.parametrize("nproc", [0, -2])
def test_nproc_below_one_is_a_config_error(tiny_llama_dir, data_files, tmp_path, nproc):
    with pytest.raises(ConfigError) as error:
        finetune(tiny_config(tiny_llama_dir, data_files), tmp_path, nproc=nproc)
    assert error.value.field == "nproc"


def test_indivisible_batch_fails_before_any_process_starts(tiny_llama_dir, data_files,
                                                          tmp_path):
    config = tiny_config(tiny_llama_dir, data_files, train={"batch_size": 4})
    with pytest.raises(ConfigError) as error:
        finetune(config, tmp_path / "x", nproc=3)
    assert error.value.field == "train.batch_size"
    assert "divisible by the 3 processes" in error.value.reason
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_a_gpu_names_the_device_field():
    with pytest.raises(ConfigError) as error:
        LocalGroup(2, "cuda", trainer=Trainer)
    assert error.value.field == "train.device"


def test_only_rank_zero_builds_a_quantum_backend(monkeypatch):
    """Ranks other than 0 never construct the real backend (no Runtime session, no
    simulator), so they cannot submit a primitive job; they only receive rank 0's results."""
    import qpa.backends.factory
    from qpa.backends.shared import SharedBackend
    from qpa.circuits import build_ansatz
    from qpa.config import QuantumOptions
    from qpa.distributed import DataParallel

    def refuse(*_args, **_kwargs):
        raise AssertionError("a rank other than 0 built a backend")

    monkeypatch.setattr(qpa.backends.factory, "make_backend", refuse)
    circuit = build_ansatz("ry_cnot", 3, 2)
    for spec in ("aer", "ibm-fake:FakeManilaV2", "statevector"):
        backend = DataParallel(rank=1, world_size=2).quantum_backend(
            spec, circuit, QuantumOptions(shots=1024))
        assert isinstance(backend, SharedBackend) and backend.inner is None
        assert backend.autograd_native == (spec == "statevector")
        assert backend.usage.jobs == 0


def test_errors_cross_process_boundaries_whole():
    """Rank 0's errors reach the other ranks pickled: type and fields must survive."""
    import pickle

    from qpa.errors import QuantumBudgetExceeded

    config_error = pickle.loads(pickle.dumps(ConfigError("train.batch_size", "odd")))
    assert (type(config_error), config_error.field, config_error.reason) == \
        (ConfigError, "train.batch_size", "odd")
    assert pickle.loads(pickle.dumps(JobCancelled(7))).step == 7
    assert str(pickle.loads(pickle.dumps(QuantumBudgetExceeded("over")))) == "over"
