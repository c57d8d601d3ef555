"""Quantum Parameter Adaptation (``method: qpa``): a circuit generates the LoRA weights.

* ``options`` the ``qpa`` section and its presets
* ``generator`` ``QPAGenerator``: circuits + mapping MLP -> the LoRA weights
* ``method``  ``QPAMethod``: PEFT LoRA layers parametrised by the generator
* ``estimate`` the jobs, circuits, shots and QPU seconds a run will use (``qpa estimate``)
"""

from qpa.methods.qpa.options import QpaOptions
from qpa.methods.registry import MethodSpec

METHOD = MethodSpec("qpa", QpaOptions, "qpa.methods.qpa.method:QPAMethod", uses_quantum=True,
                    estimator="qpa.methods.qpa.estimate:estimate_job")
