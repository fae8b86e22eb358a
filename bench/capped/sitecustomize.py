"""Caps this process's CUDA memory at $BENCH_GPU_MEMORY_GIB (bench.run --memory-budget puts this folder on
PYTHONPATH): the caching allocator then fails as a GPU of that size would, so a plan that does not fit shows up
as an out-of-memory error in the run."""

import os

if os.environ.get("BENCH_GPU_MEMORY_GIB"):
    budget = float(os.environ.pop("BENCH_GPU_MEMORY_GIB"))  # not again in this process's children (compile workers)
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget * 2**30 / total))
