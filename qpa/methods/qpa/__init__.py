"""Quantum Parameter Adaptation (``method: qpa``): a circuit generates the LoRA weights.

* ``options`` the ``qpa`` section and its presets
* ``method``  ``QPAMethod``: PEFT LoRA layers parametrised by ``qpa.generator``
"""

from qpa.methods.qpa.options import QpaOptions
from qpa.methods.registry import MethodSpec

METHOD = MethodSpec("qpa", QpaOptions, "qpa.methods.qpa.method:QPAMethod", uses_quantum=True)
