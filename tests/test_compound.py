"""Compound adapters: minors, orthogonality, zero change at init, training under every option
combination, the RBS circuit on Aer, accounting, and the stock-PEFT export round trip in a
process that cannot import qpa or qiskit."""

from __future__ import annotations

import copy
import itertools
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from qpa.config import JobConfig
from qpa.errors import ConfigError
from qpa.methods.compound.export import convert_to_oft
from qpa.methods.compound.minors import (
    compound_matrix,
    largest_n,
    plan_layout,
    submatrices,
)
from qpa.methods.compound.model import CompoundMethod
from qpa.methods.compound.options import CompoundOptions

LLAMA_TARGETS = ["q_proj", "v_proj"]
GPT2_TARGETS = ["c_attn"]


def job(**compound) -> JobConfig:
    # These tests were written against 4 unshared blocks, now the "paper" preset.
    compound.setdefault("preset", "paper")
    return JobConfig(train_file="unused.jsonl", method="compound", compound=compound)


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids oversubscribing the shared CI cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama()


def logits(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch).logits


def train(model: torch.nn.Module, method: CompoundMethod, batch: torch.Tensor,
          steps: int = 6, lr: float = 0.05) -> tuple[float, float]:
    """A plain AdamW loop; returns (loss before, loss after)."""
    optimizer = torch.optim.AdamW(method.trainable_parameters(), lr=lr, weight_decay=0.0)
    with torch.no_grad():
        before = model(input_ids=batch, labels=batch).loss.item()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model(input_ids=batch, labels=batch).loss.item()
    return before, after


# -- the maths -----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3])
def test_compound_minors_equal_brute_force_determinants(k: int) -> None:
    u = torch.randn(2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    subsets = list(itertools.combinations(range(6), k))
    reference = torch.tensor([[[np.linalg.det(u[b][np.ix_(rows, cols)].numpy())
                                for cols in subsets] for rows in subsets] for b in range(2)])
    assert (compound_matrix(u, k) - reference).abs().max() < 1e-12


@pytest.mark.parametrize("reduction", ["max", "avg"])
def test_ablation_reductions_are_anchored_entry_max_and_mean(reduction: str) -> None:
    u = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eye = torch.eye(5, dtype=torch.float64)
    for k in (2, 3):
        reduce = (lambda g: g.amax(dim=(-2, -1))) if reduction == "max" else \
            (lambda g: g.mean(dim=(-2, -1)))
        size = math.comb(5, k)
        expected = reduce(submatrices(u, k)) - reduce(submatrices(eye, k)) + torch.eye(size)
        assert torch.allclose(compound_matrix(u, k, reduction), expected.to(u.dtype))
        assert torch.equal(compound_matrix(eye, k, reduction), torch.eye(size, dtype=u.dtype))


def test_layout_follows_the_paper_and_rejects_bad_blocks(llama) -> None:
    layout = plan_layout(576, 4, (1, 2))  # SmolLM2-135M q_proj: 4 blocks of 144
    assert (layout.block_size, layout.n, layout.active_size) == (144, 16, 136)
    assert largest_n(16, (1, 2, 3)) == 4 and largest_n(16, (3,)) == 5
    with pytest.raises(ConfigError) as error:
        CompoundMethod(job(blocks=3), LLAMA_TARGETS).attach(copy.deepcopy(llama))
    assert error.value.field == "compound.blocks"
    with pytest.raises(ConfigError) as error:
        CompoundMethod(job(), ["embed_tokens"]).attach(copy.deepcopy(llama))
    assert error.value.field == "lora.target_modules"
    with pytest.raises(ConfigError):
        CompoundMethod(job(), ["no_such_module"]).attach(copy.deepcopy(llama))


@pytest.mark.parametrize("orders", [[1], [2], [3], [1, 2], [1, 2, 3]])
@pytest.mark.parametrize("share,adapters", [(False, 1), (True, 2)])
def test_every_block_is_orthogonal(llama, orders, share, adapters) -> None:
    method = CompoundMethod(job(orders=orders, block_share=share, num_adapters=adapters),
                            LLAMA_TARGETS)
    method.attach(copy.deepcopy(llama))
    for layer in method.layers.values():
        with torch.no_grad():
            torch.nn.init.normal_(layer.compound.weight, std=0.7)
            blocks = layer.compound.rotation_blocks()
        eye = torch.eye(blocks.shape[-1])
        assert (blocks.transpose(-2, -1) @ blocks - eye).abs().max() <= 1e-5


# -- every option combination: zero change at init, and training lowers the loss ----------

ORDER_SUBSETS = [list(c) for r in (1, 2, 3) for c in itertools.combinations((1, 2, 3), r)]
COMBINATIONS = list(itertools.product(ORDER_SUBSETS, [False, True], [1, 2], [True, False],
                                      ["det", "max", "avg"]))


@pytest.mark.parametrize(
    "orders,share,adapters,orthogonal,reduction", COMBINATIONS,
    ids=[f"k{''.join(map(str, o))}-share{int(s)}-a{a}-orth{int(t)}-{r}"
         for o, s, a, t, r in COMBINATIONS],
)
def test_option_combination_starts_at_base_and_trains(llama, batch, orders, share, adapters,
                                                       orthogonal, reduction) -> None:
    base_logits = logits(llama, batch)
    # Blocks of 32 (blocks=2): with blocks of 16, orders=[3] gives n = 5 < 2k, where U = I is
    # a stationary point of the max ablation (see qpa.methods.compound.minors).
    config = job(orders=orders, block_share=share, num_adapters=adapters,
                 orthogonal=orthogonal, reduction=reduction, blocks=2)
    method = CompoundMethod(config, LLAMA_TARGETS)
    model = method.attach(copy.deepcopy(llama))
    assert torch.equal(logits(model, batch), base_logits)
    before, after = train(model, method, batch)
    assert after < before - 1e-3


def test_gpt2_conv1d_starts_at_base_and_trains(batch) -> None:
    base = tiny_gpt2()
    for options in ({}, {"block_share": True, "num_adapters": 2, "orders": [1, 2, 3]}):
        method = CompoundMethod(job(**options), GPT2_TARGETS)
        model = method.attach(copy.deepcopy(base))
        assert torch.equal(logits(model, batch), logits(base, batch))
        before, after = train(model, method, batch)
        assert after < before - 1e-3


def test_merged_weight_matches_the_adapted_layer_for_linear_and_conv1d(llama) -> None:
    for base, targets in ((llama, LLAMA_TARGETS), (tiny_gpt2(), GPT2_TARGETS)):
        method = CompoundMethod(job(orders=[1, 2, 3]), targets)
        method.attach(copy.deepcopy(base))
        for layer in method.layers.values():
            with torch.no_grad():
                torch.nn.init.normal_(layer.compound.weight, std=0.5)
                x = torch.randn(3, layer.compound.layout.in_features)
                merged = layer.effective_weight()
                plain = x @ merged if layer.is_conv1d else x @ merged.T
                if layer.base_layer.bias is not None:
                    plain = plain + layer.base_layer.bias
                assert torch.allclose(layer(x), plain, atol=1e-5)


def test_attach_freezes_the_base_and_state_round_trips(llama) -> None:
    method = CompoundMethod(job(), LLAMA_TARGETS)
    model = method.attach(copy.deepcopy(llama))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.endswith("compound.weight") for name in trainable)
    assert len(method.trainable_modules()) == 4  # q_proj and v_proj in 2 layers
    state = copy.deepcopy(method.state_dict())  # module state_dicts share storage
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(1.0)
    method.load_state_dict(state)
    assert all(p.abs().max() == 0 for p in method.trainable_parameters())


# -- accounting ------------------------------------------------------------------------------

@pytest.mark.parametrize("share", [False, True])
def test_parameter_report_matches_peft(llama, share) -> None:
    from peft import OFTConfig, get_peft_model

    method = CompoundMethod(job(orders=[1, 2], blocks=4, block_share=share), LLAMA_TARGETS)
    method.attach(copy.deepcopy(llama))
    report = method.parameter_report()
    # 4 modules of width 64 -> blocks of 16, n = 5 (5 + 10 <= 16): 10 Cayley coordinates each
    assert report["trainable_params"] == 4 * (1 if share else 4) * 10
    lora_r = method.config.lora.r
    assert report["lora_equivalent_params"] == 2 * lora_r * (64 + 64) + 2 * lora_r * (64 + 32)
    oft = get_peft_model(copy.deepcopy(llama), OFTConfig(
        r=4, oft_block_size=0, target_modules=LLAMA_TARGETS, block_share=share))
    assert report["oft_equivalent_params"] == oft.get_nb_trainable_parameters()[0]
    assert report["ratio_to_lora"] == pytest.approx(
        report["trainable_params"] / report["lora_equivalent_params"])
    assert report["oft_compression"] == pytest.approx(
        report["oft_equivalent_params"] / report["trainable_params"])


# -- the circuit -------------------------------------------------------------------------

def _trained_unitary(llama, batch) -> torch.Tensor:
    method = CompoundMethod(job(orders=[1, 2, 3], blocks=2), LLAMA_TARGETS)
    model = method.attach(copy.deepcopy(llama))
    train(model, method, batch, steps=3, lr=0.2)
    name = next(iter(method.layers))
    assert method.circuit(name).num_qubits == 5
    return method.unitaries(name)[0, 0].double()


def test_rbs_circuit_acts_as_compound_on_aer(llama, batch) -> None:
    from qiskit import transpile
    from qiskit_aer import AerSimulator

    from qpa.methods.compound.circuit import compound_circuit, weight_basis_indices

    trained = _trained_unitary(llama, batch)  # n = 5 for blocks of 32 and orders 1, 2, 3
    # Re-orthogonalise the fp32 training result in fp64 (its polar factor) so 1e-6 is meaningful.
    left, _, right = torch.linalg.svd(trained)
    trained = left @ right
    reflection = torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0], dtype=torch.float64))
    simulator = AerSimulator(method="statevector")
    n = trained.shape[0]
    for unitary in (trained, trained @ reflection):  # det +1 and det -1 (the Z sign fix)
        assert not torch.allclose(unitary, torch.eye(n, dtype=unitary.dtype), atol=1e-3)
        circuit = compound_circuit(unitary)
        jobs, expected = [], []
        for k in (1, 2, 3):
            basis = weight_basis_indices(n, k)
            compound = compound_matrix(unitary, k).numpy()
            for column, index in enumerate(basis):
                prepared = circuit.copy_empty_like()
                for qubit in range(n):
                    if index >> qubit & 1:
                        prepared.x(qubit)
                prepared.compose(circuit, inplace=True)
                prepared.save_statevector()
                jobs.append(prepared)
                amplitudes = np.zeros(2**n)
                amplitudes[basis] = compound[:, column]
                expected.append(amplitudes)
        result = simulator.run(transpile(jobs, simulator)).result()
        for position, amplitudes in enumerate(expected):
            state = np.asarray(result.get_statevector(position))
            assert np.abs(state - amplitudes).max() <= 1e-6


# -- export to stock PEFT ---------------------------------------------------------------

CHILD = textwrap.dedent('''
    import sys
    sys.modules["qpa"] = None      # make `import qpa` and `import qiskit` fail in this process
    sys.modules["qiskit"] = None
    import json
    for blocked in ("qpa", "qiskit"):
        try:
            __import__(blocked)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{blocked} is importable")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cases = json.loads(sys.argv[1])
    out = {}
    for name, case in cases.items():
        base = AutoModelForCausalLM.from_pretrained(case["base"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, case["adapter"]).eval()
        data = torch.load(case["data"])
        with torch.no_grad():
            got = model(input_ids=data["input_ids"]).logits
        out[name] = (got - data["logits"]).abs().max().item()
    print(json.dumps(out))
''')


def _eigenvalue_minus_one(method: CompoundMethod) -> None:
    """U = rotations by pi/2 in planes (0,1) and (2,3): C_2(U) has the eigenvalue -1."""
    layer = next(iter(method.layers.values()))
    n = layer.compound.layout.n
    skew = torch.zeros(n, n)
    # Cayley: angle theta <-> skew entry -tan(theta / 2); tan(pi/4) = 1.
    skew[0, 1] = skew[2, 3] = -1.0
    rows, cols = torch.triu_indices(n, n, offset=1)
    with torch.no_grad():
        layer.compound.weight[:] = skew[rows, cols]


EXPORT_CASES = {
    # name: (model factory, targets, compound options, expected peft_type)
    "llama_oft": (tiny_llama, LLAMA_TARGETS + ["down_proj"], {}, "OFT"),
    "llama_oft_shared": (tiny_llama, LLAMA_TARGETS,
                         {"orders": [1, 2, 3], "block_share": True, "num_adapters": 2}, "OFT"),
    "gpt2_conv1d": (tiny_gpt2, GPT2_TARGETS + ["c_fc"], {}, "LORA"),
    "llama_max": (tiny_llama, LLAMA_TARGETS, {"reduction": "max"}, "LORA"),
    "llama_not_orthogonal": (tiny_llama, LLAMA_TARGETS, {"orthogonal": False}, "LORA"),
    "llama_minus_one": (tiny_llama, LLAMA_TARGETS, {}, "LORA"),
    # Every preset is an exact stock PEFT OFT adapter.
    **{f"preset_{name}": (tiny_llama, LLAMA_TARGETS, {"preset": name}, "OFT")
       for name in CompoundOptions.PRESETS},
}


def test_export_round_trip_with_stock_peft_only(tmp_path: Path, batch) -> None:
    cases, facts = {}, {}
    for name, (factory, targets, options, _) in EXPORT_CASES.items():
        base = factory()
        base.save_pretrained(tmp_path / name / "base")
        method = CompoundMethod(job(**options), targets)
        model = method.attach(base)
        train(model, method, batch, steps=4, lr=0.1)
        if name == "llama_minus_one":
            _eigenvalue_minus_one(method)
            first = next(iter(method.layers.values()))
            assert "eigenvalue" in convert_to_oft(first).reason
        trained = logits(model, batch)
        assert (trained - logits(factory(), batch)).abs().max() > 1e-3  # training did something
        facts[name] = method.export_adapter(tmp_path / name / "adapter")
        torch.save({"input_ids": batch, "logits": trained}, tmp_path / name / "data.pt")
        cases[name] = {"base": str(tmp_path / name / "base"),
                       "adapter": str(tmp_path / name / "adapter"),
                       "data": str(tmp_path / name / "data.pt")}
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300,
                           env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert child.returncode == 0, child.stderr[-3000:]
    diffs = json.loads(child.stdout.strip().splitlines()[-1])
    for name, (_, _, _, peft_type) in EXPORT_CASES.items():
        assert diffs[name] <= 1e-4, (name, diffs[name])
        written = json.loads((tmp_path / name / "adapter" / "adapter_config.json").read_text())
        assert written["peft_type"] == facts[name]["peft_type"] == peft_type
        assert facts[name]["exact"] == (peft_type == "OFT")
        if peft_type == "OFT":
            assert written["use_cayley_neumann"] is False and not facts[name]["modules_merged"]
        else:  # the fallback is reported, module by module, never silent
            assert facts[name]["modules_merged"] and facts[name]["inexact_modules"]
            assert any("OFT" in note for note in facts[name]["notes"])
    assert "Conv1D" in next(iter(facts["gpt2_conv1d"]["inexact_modules"].values()))
    assert "not orthogonal" in next(iter(facts["llama_max"]["inexact_modules"].values()))
