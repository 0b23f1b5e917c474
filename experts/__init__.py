"""Expert language models: seeds, branching, the training loop, and merging (ensembles, averaging, MoE)."""
