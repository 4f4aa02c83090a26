"""Optional GPU kernels (Triton). Nothing here is imported by ``import qwen_magic``; each module
imports torch (and triton, lazily) itself."""
