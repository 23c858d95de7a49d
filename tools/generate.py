#!/usr/bin/env python
"""Generate text with a (dense or SPD) model over tensor parallelism, streaming on rank 0.

The command is megatron_spd.cli.generate (also installed as ``megatron-spd-generate``)."""
from megatron_spd.cli.generate import main

if __name__ == "__main__":
    main()
