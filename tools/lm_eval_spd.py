#!/usr/bin/env python
"""lm-evaluation-harness's command line with the ``megatron-spd`` model backend registered.

The command is megatron_spd.cli.lm_eval_spd (also installed as ``megatron-spd-lm-eval``)."""
from megatron_spd.cli.lm_eval_spd import main

if __name__ == "__main__":
    main()
