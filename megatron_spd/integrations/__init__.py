"""Layer "integrations": megatron-spd inside other people's programs.

``megatron_lm`` (the hooks the Megatron-LM patch calls), ``vllm`` (the model plugin that serves
SPD checkpoints). Each integration imports its host (Megatron-LM, vLLM, lm-eval) only here, so
the rest of the package works without them.
"""
