"""Framework-exact Adam (PyTorch, Keras) and PyTorch state conversion."""
