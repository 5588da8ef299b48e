"""Training: per-worker loop, solvers, Ray Train builder, checkpoints, history, and which rows train (sampling)."""
