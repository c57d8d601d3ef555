"""PEFT VeRA (Kopiczko et al. 2024) as ``method: vera``: a classical tiny-parameter baseline.

One pair of frozen random projections (A, B) is shared by every adapted module; each module
trains only two scaling vectors, so the trainable count is ``r + out_features`` per module.

* ``options`` the ``vera`` section
* ``method``  ``VeraMethod`` on PEFT's own VeRA layers; exports a stock PEFT VeRA adapter
"""

from qpa.methods.registry import MethodSpec
from qpa.methods.vera.options import VeraOptions

METHOD = MethodSpec("vera", VeraOptions, "qpa.methods.vera.method:VeraMethod")
