"""The SPD recipe (design.md 1, paper Algorithm 1): sensitivity sweep -> plan (classification)
-> head grouping (HG) -> block-to-block distillation (B2B).

Modules: ``activations`` (running megatron layers on cached hidden states), ``sensitivity``,
``classify``, ``headgroup``, ``distill``, ``autoplan`` (target ratio or perplexity budget -> plan
-> recovered weights), ``run`` (what the command line ``tools/spd.py`` runs). docs/recipe.md has
the measurements.
"""
