"""Host side of accllm: the command-line interface and the runtime that drives the accelerator."""
