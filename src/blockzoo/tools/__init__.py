"""Tools that work on blocks and models: the block catalogue, profiling, the CLI's helpers."""
