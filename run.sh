#!/usr/bin/env bash
# One entry point for a fresh machine:
#   ./run.sh demo [args]    set up, then train a permuted sparse MLP on bundled data (python -m padst_ext.experiments.demo)
#   ./run.sh train [args]   set up, then padst-train (e.g. ./run.sh train vit --quick: a sparse ViT on Fashion-MNIST)
#   ./run.sh test [args]    set up, then run the test suite (python -m pytest -q tests)
#   ./run.sh bench [args]   set up, then python benchmarks/cpu_ops.py
#   ./run.sh setup          only the set-up
# Set-up is idempotent: creates .venv (VENV=...), installs torch (TORCH_SPEC, default torch==2.14.1) and
# requirements-dev.txt, and builds padst_ext in place (pip install --no-build-isolation -e .), which only
# recompiles what changed. PADST_WITH_CUDA / PADST_CUDA_ARCHS pass through to the build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

setup() {
  if [[ ! -x "${VENV}/bin/python" ]]; then
    echo "[run.sh] creating ${VENV}"
    "${PYTHON:-python3}" -m venv "${VENV}"
  fi
  PY="${ROOT}/${VENV}/bin/python"
  local stamp="${VENV}/.padst-deps" want
  want="${TORCH_SPEC} $(cksum < requirements-dev.txt)"
  if [[ ! -f "${stamp}" || "$(cat "${stamp}")" != "${want}" ]]; then
    echo "[run.sh] installing ${TORCH_SPEC} and requirements-dev.txt"
    "${PY}" -m pip install -q "${TORCH_SPEC}" -r requirements-dev.txt
    echo "${want}" > "${stamp}"
  fi
  echo "[run.sh] building padst_ext (incremental)"
  # the venv's cmake/ninja first on PATH; --no-build-isolation builds against the torch installed above
  PATH="${ROOT}/${VENV}/bin:${PATH}" "${PY}" -m pip install --no-build-isolation -e .
}

cmd=${1:-}
[[ $# -gt 0 ]] && shift
case "${cmd}" in
  setup) setup ;;
  demo) setup; exec "${PY}" -m padst_ext.experiments.demo "$@" ;;
  train) setup; exec "${PY}" -m padst_ext.experiments.recipes "$@" ;;
  test) setup; exec "${PY}" -m pytest -q tests "$@" ;;
  bench) setup; exec "${PY}" benchmarks/cpu_ops.py "$@" ;;
  *) echo "usage: ./run.sh demo|train|test|bench|setup [args]" >&2; exit 2 ;;
esac
