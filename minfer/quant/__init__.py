"""Weight quantization: int8 and int4 (``int8``, ``int4``), the GGUF block formats decoded in plain PyTorch
(``gguf_formats``), the quantized linears (``linear``) and whole models (``apply``). docs/quantization.md."""
