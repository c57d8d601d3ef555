"""``quantum.preset: qpu-economy``: what it sets, what it refuses, and that it is the setting
bench/bench_qpu.py chose (once a full run is committed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpa.config import QUANTUM_PRESETS, parse_config
from qpa.errors import ConfigError

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results" / "qpu.json"


def test_preset_fills_its_options_where_the_job_is_silent() -> None:
    economy = QUANTUM_PRESETS["qpu-economy"]
    config = parse_config({"train_file": "t.jsonl", "backend": "ibm-fake:FakeFez",
                           "quantum": {"preset": "qpu-economy"}, "qpa": {"preset": "compact"}})
    for section, options in economy.items():
        for key, value in options.items():
            assert getattr(getattr(config, section), key) == value, f"{section}.{key}"
    assert config.qpa.chunk_size == 64  # the qpa preset is untouched
    own = parse_config({"train_file": "t.jsonl", "backend": "aer",
                        "quantum": {"preset": "qpu-economy", "shots": 99},
                        "qpa": {"update_every": 3, "ablation": "none"}})
    assert (own.quantum.shots, own.qpa.update_every, own.qpa.ablation) == (99, 3, "none")


@pytest.mark.parametrize(("body", "field"), [
    ({"quantum": {"preset": "qpu-economy"}}, "quantum.preset"),  # statevector: no shots
    ({"backend": "aer", "quantum": {"preset": "cheap"}}, "quantum.preset"),
    ({"backend": "aer", "quantum": {"preset": {}}}, "quantum.preset"),  # found by the fuzz test
    ({"backend": "aer", "quantum": "qpu-economy"}, "quantum"),
])
def test_bad_presets_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"train_file": "t.jsonl", **body})
    assert error.value.field == field


def test_preset_is_what_the_committed_benchmark_recommends() -> None:
    from qpa.config import QuantumOptions

    description = QuantumOptions.model_fields["preset"].description
    if not RESULTS.is_file():
        # No full run committed yet: the preset must say it is a guess, not a measurement.
        assert "Provisional" in description
        return
    assert "Provisional" not in description, "the measured preset is no longer provisional"
    results = json.loads(RESULTS.read_text())
    # The cheapest setting keeping >= 95 % of exact QPA's gain; when none does, the closest,
    # and then the preset must say how far below the target it is.
    chosen = results["recommendation"] or results["closest"]
    assert chosen is not None, "the full run priced no shot-based setting"
    assert QUANTUM_PRESETS["qpu-economy"] == chosen["preset"]
    if results["recommendation"] is None:
        assert f"{chosen['share_of_exact_gain']:.0%}" in description
