"""Built on any member: injection, packing, averaging, accumulation, sharding, checkpoints, diagnostics."""
