#!/usr/bin/env python
"""Latency of SPD plans: time to first token and time per output token against the SPD ratio,
the link simulator, and the analytic projection to LLaMA-2 shapes (docs/latency.md).

The command is megatron_spd.cli.benchmark (also installed as ``megatron-spd-benchmark``)."""
from megatron_spd.cli.benchmark import main

if __name__ == "__main__":
    main()
