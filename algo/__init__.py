"""Model-level algorithms of accllm: model loading, the perplexity harness, recipes,
N:M pruning, Λ-shaped attention and SpAtten cascade token/head pruning."""
