"""Training: the loop, optimizer, checkpoints, metrics."""
