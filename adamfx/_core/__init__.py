"""The core: numerics, checks, the per-leaf math, the one tree driver and its tail options."""
