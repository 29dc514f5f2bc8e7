"""megatron-core on CPU: the compatibility layer, parallel layouts and state, sequence parallelism, MoE layers, GPU paths."""
