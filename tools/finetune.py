#!/usr/bin/env python
"""Fine-tune an SPD model (its plan is inside the checkpoint) on text, at any TP x DP.

The command is megatron_spd.cli.finetune (also installed as ``megatron-spd-finetune``)."""
from megatron_spd.cli.finetune import main

if __name__ == "__main__":
    main()
