"""Layer "cli": the command lines, on top of every other layer.

``common`` (parsers, options from config dataclasses, output checks, one-line errors), ``logs``
(the one logging set-up) and one module per command (``convert_checkpoint``, ``spd``,
``finetune``, ``generate``, ``evaluate``, ``benchmark``, ``lm_eval_spd``), each with ``main``; ``tools/*.py`` and
the console scripts call them. The commands print their results; everything else is logged.
"""
