"""Small GPU kernels for the fast engine, imported lazily (``import qwen_magic`` needs neither torch nor triton)."""
