"""The public builders: optax's Adam family and the low-bit aliases."""
