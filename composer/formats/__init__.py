"""File formats: ``files`` (atomic writes, safetensors reads, tensor checks), ``composition``
(our composition directory) and ``peft`` (HF PEFT's adapter directory). Nothing is unpickled."""
