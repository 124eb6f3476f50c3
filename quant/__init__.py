"""Quantization of accllm (W2A8KV4 on brevitas), the recipe pipeline and the packed model format."""
