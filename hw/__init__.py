"""Accelerator of accllm: the Amaranth design, its instruction set and the compiler to it."""
