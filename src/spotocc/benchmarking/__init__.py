"""Benchmarking: time and peak memory of the model's stages and of label formation, and their inputs.

- :mod:`~spotocc.benchmarking.stages`: every stage of a model in inference and in a training step,
  one config or two side by side (``spotocc benchmark``);
- :mod:`~spotocc.benchmarking.inputs`: a batch of a preset's real sizes, made without data on disk;
- :mod:`~spotocc.benchmarking.memory`: peak memory of a block (CUDA allocator, or resident set);
- :mod:`~spotocc.benchmarking.labels`: realistic synthetic head outputs and the timing of
  ``occupancy_labels`` per method (``benchmarks/bench_labels.py``).

Nothing in :mod:`spotocc.models` imports this package.
"""
