"""Quantum backends behind one interface, chosen by the job config's ``backend`` string.

``statevector`` exact torch simulation (autograd) | ``aer`` qiskit-aer primitives |
``ibm:<name>`` Qiskit Runtime on IBM hardware | ``ibm-fake:<FakeX>`` the same Runtime code
path in local testing mode against a fake backend shipped by qiskit-ibm-runtime.

* ``spec``        the backend string's syntax and kinds (no qiskit: the config imports it)
* ``factory``     checking a job's backend when it is prepared, and building it
* ``base``        the interface and usage accounting; ``statevector``, ``aer``, ``ibm``
  the backends; ``shared`` rank 0's backend shared with data-parallel ranks

This package's ``__init__`` imports nothing, so that ``spec`` stays qiskit-free.
"""
