#!/usr/bin/env python3
"""Training-step throughput benchmark (see megatron_llamapro/training/benchmark.py).

GPU:  python tools/benchmark_train.py [--fp8 hybrid] [--micro-batch-size 2] [--compare-hf]
CPU:  python tools/benchmark_train.py --small --precision fp32 --compare-hf
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_llamapro.errors import run  # noqa: E402
from megatron_llamapro.training.benchmark import main  # noqa: E402

if __name__ == "__main__":
    run(main)
