"""Benchmarks of the kernel library (imports ``kernels`` and ``models`` only).

    python bench/sweep.py [--quick]      correctness-gated launch-config sweep, tuned tables,
                                         speed-up vs dense / CSR / surviving-neuron GEMM
    python bench/e2e.py [--quick]        ViT-B/16 and BERT-base step time and peak memory
    python bench/cpu_infer.py [--quick]  batch-1 CPU inference of the sparse layers vs nn.Linear

``common.py`` holds what the three share: the environment header, the timers, the
correctness gate and the tuned-table I/O. ``ops.py`` describes every benchmarked product.
"""
