"""Layer "checkpoint": Megatron-LM checkpoints with the SPD plan inside.

``layout`` (the names on disk, ``StoredCheckpoint``, where a directory's weights are),
``manifest`` (bytes and sha256 of every file), ``read`` (what a checkpoint holds; its weights),
``legacy`` (the format-1 reader), ``save`` (the atomic, in-process save; what ``--out`` may
replace), ``args`` (ModelConfig + plan <-> the ``args`` Megatron-LM keeps in ``common.pt``).
"""
