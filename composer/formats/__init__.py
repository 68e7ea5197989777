"""File formats: ``files`` (safe names, bounded JSON and safetensors reads, tensor checks),
``commit`` (crash-safe saves), ``manifest`` (``composition.json``'s schema), ``composition``
(our composition directory), ``peft`` and ``peft_fields`` (HF PEFT's adapter directory).
Nothing is unpickled; see README "Safety" for what reading an untrusted directory can do."""
