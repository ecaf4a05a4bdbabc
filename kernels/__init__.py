"""fp4fmt.kernels: GPU kernels (Triton) that consume fp4fmt packed weights directly. Empty in v0.1."""
