"""Layer "integrations": megatron-spd inside other people's programs.

``megatron_lm`` (the hooks the Megatron-LM patch calls), ``megatron_dynamic`` (megatron-core
0.19's own dynamic inference engine and OpenAI-style server around an SPD model), ``vllm`` (the
model plugin that serves SPD checkpoints), ``lm_eval`` (the lm-evaluation-harness model backend
``megatron-spd``, registered on import), ``lm_eval_tasks`` (offline lm-eval task YAMLs for the
paper's tasks) and ``lm_eval_agreement`` (lm-eval and our evaluator item by item). Each
integration imports its host (Megatron-LM, megatron-core's server, vLLM, lm-eval) only here, so
the rest of the package works without them.
"""
