"""Training: optimizers, the loop, evaluation, checkpoints and generation."""
