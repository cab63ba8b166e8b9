"""Training, evaluation, prediction, checkpoints, distributed helpers and benchmarks."""
