"""Inference-ready outputs of a finished job beyond the stock PEFT adapter.

``export: {formats: [peft, merged, gguf]}`` in the job config chooses them:

* ``peft``   ``<output>/adapter/``, always written (``AdapterMethod.export_adapter``)
* ``merged`` ``<output>/merged/``, the base model with the adapter merged in (``merged``)
* ``gguf``   ``<output>/adapter.gguf``, a llama.cpp LoRA adapter (``gguf``, from ``lora``)

and every job writes ``<output>/loss.png`` (``plot``). ``formats`` holds the trainer's
calls. Import the modules themselves: this package imports nothing, so that light
consumers (``plot.sparkline`` in the CLI client) do not pay for transformers.
"""
