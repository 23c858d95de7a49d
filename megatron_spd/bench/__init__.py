"""Latency benchmark and plots (design.md 6): ``latency`` times prefill and decode for SPD ratios
at T ranks (with the stock megatron-core model as the baseline), ``analytic`` predicts the same
for shapes this machine cannot run, ``runner`` is what tools/benchmark.py calls, ``report`` and
``plots`` turn the JSON into docs/latency.md and PNGs."""
