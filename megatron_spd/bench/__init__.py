"""Latency benchmark and plots (design.md 6): ``latency`` times prefill and decode for SPD ratios
at T ranks (with the stock megatron-core model as the baseline), ``analysis`` turns those records
into statistics, the bound and the analytic model's validation, ``analytic`` predicts the same
for shapes this machine cannot run, ``run`` is what tools/benchmark.py calls, ``markdown`` and
``plots`` turn the JSON into summaries, docs/latency.md and PNGs."""
