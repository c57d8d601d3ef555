"""A data-parallel helper rank, started by ``qpa.distributed.LocalGroup`` as
``python -m qpa.helper_rank``: join rank 0's group, then train every job it sends.

Its own module so that ``qpa.distributed`` never imports the trainer (``qpa.training``
imports it: that would be an import cycle).
"""

import os
import sys

from qpa.distributed import helper_main
from qpa.training import Trainer

if __name__ == "__main__":
    code = helper_main(Trainer)
    # Nothing to tear down that matters, and interpreter shutdown (torch, qiskit) takes
    # seconds rank 0 would wait for: flush and leave.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
