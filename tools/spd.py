#!/usr/bin/env python
"""The SPD recipe from the command line: sensitivity -> plan -> headgroup / distill -> checkpoint.

The command is megatron_spd.cli.spd (also installed as ``megatron-spd-spd``)."""
from megatron_spd.cli.spd import main

if __name__ == "__main__":
    main()
