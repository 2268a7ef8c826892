"""Row-sparse gradients and lazy Adam for embedding tables."""
