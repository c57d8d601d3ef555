"""Quantum-inspired compound adapters (Coyle & Raj 2025) as ``method: compound``.

* ``options`` the ``compound`` section and its presets
* ``minors``  batched compound matrices, the Cayley map, the block layout
* ``layer``   the adapter on one module (math) and the wrapped Linear/Conv1D
* ``model``   injection into a model and ``CompoundMethod`` (the trainer's interface)
* ``export``  conversion to stock PEFT (OFT, or an exact LoRA fallback)
* ``circuit`` a trained U as an RBS circuit (imports qiskit; import it explicitly)
"""

from qpa.methods.compound.options import CompoundOptions
from qpa.methods.registry import MethodSpec

METHOD = MethodSpec("compound", CompoundOptions, "qpa.methods.compound.model:CompoundMethod")
