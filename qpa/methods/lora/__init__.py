"""Plain LoRA through PEFT (``method: lora``): the baseline every method is compared with.

* ``options`` the ``lora`` section (its targets and rank are read by every method)
* ``method``  ``LoraMethod`` and the PEFT LoRA config QPA shares
"""

from qpa.methods.lora.options import LoraOptions
from qpa.methods.registry import MethodSpec

METHOD = MethodSpec("lora", LoraOptions, "qpa.methods.lora.method:LoraMethod")
