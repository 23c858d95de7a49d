"""Layer "core": the SPD model itself, with no I/O, data or command line.

``config`` (ModelConfig: a shape independent of TP), ``plan`` (SPDPlan: G and a strategy per
block; the plan file), ``layers`` (SPD-aware column/row-parallel linears), ``compensation`` (the
rank-local compensation module), ``block`` (SPDTransformerLayer), ``cached_attention`` (the
KV-cached self-attention the spec builds), ``spec`` (ModuleSpecs from a plan -> GPTModel),
``sharding`` (full state dict <-> TP shards, logits), ``grads`` (summing per-rank partial grads).
"""
