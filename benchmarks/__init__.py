"""Benchmarks of VLoRA against dense and against the official PyTorch code, on one harness.

Run each from the repository root as ``python -m benchmarks.<name> --help``:

  bench     the main comparison: train step, inference, compile time, memory, checkpoint bytes
            and the official PyTorch step, as ratios with targets
  core      materialisation cost against the forward pass; compile time against depth
  train     train-step throughput against this machine's matmul ceiling
  memory    train-step memory (compiled and measured peak RSS); the deepest model a budget fits
  malloc    the glibc allocator settings on each way a process starts
  profile   where a step's time goes (a trace summed per XLA op) and A/B timings of config
            overrides, XLA flags and git revisions

`benchmarks.harness` is what they share: the environment record, interleaved timing, the resident
worker process and the JSON + markdown output. Results are in ``benchmarks/results/``;
``results/perf_notes.md`` collects what the CPU investigations found.

This package imports nothing heavy: the official PyTorch worker (`benchmarks.torch_ref`) runs it
in a venv without JAX.
"""
