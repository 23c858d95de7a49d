#!/usr/bin/env python
"""Convert a Hugging Face LLaMA directory, a GGUF file or a checkpoint (megatron-spd's or
Megatron-LM's) into a megatron-spd checkpoint, which is a Megatron-LM checkpoint with the SPD
plan inside, at TP degree T, or back to Hugging Face.

The command is megatron_spd.cli.convert_checkpoint (installed as ``megatron-spd-convert-checkpoint``)."""
from megatron_spd.cli.convert_checkpoint import main

if __name__ == "__main__":
    main()
