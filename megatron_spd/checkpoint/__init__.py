"""Layer "checkpoint": Megatron-LM checkpoints with the SPD plan inside.

``store`` (layout: tracker, ``release``/``iter_*`` torch_dist, manifest, legacy format, atomic
save), ``args`` (ModelConfig + plan <-> the ``args`` Megatron-LM keeps in ``common.pt``).
"""
