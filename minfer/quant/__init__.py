"""Weight-only quantization.

- ``gguf_formats``: the GGUF block formats (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...)
  decoded in plain PyTorch, so a reader can see every bit of the layout.
"""
