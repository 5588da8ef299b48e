"""Training: per-worker loop, solvers, Ray Train builder, checkpoints and history."""
