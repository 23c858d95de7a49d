#!/usr/bin/env python
"""Zero-shot accuracy (lm-eval conventions) and perplexity of a model under an SPD plan.

The command is megatron_spd.cli.evaluate (also installed as ``megatron-spd-evaluate``)."""
from megatron_spd.cli.evaluate import main

if __name__ == "__main__":
    main()
