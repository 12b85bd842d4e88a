#!/usr/bin/env bash
# One prepared GPU run (H100/H200, ~3-4 min incl. Triton autotuning): versions -> numerics -> benchmark.
#   bash bench/gpu_check.sh            (from the repository root; writes $OUT/moe_kernels.json if $OUT is set)
# The package need not be installed: a throw-away `moe2edge` package of symlinks maps the source tree
# (moe2edge/ + kernels/, teacher/, ... as in pyproject's package-dir) onto PYTHONPATH.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

SHIM="$(mktemp -d)"
trap 'rm -rf "$SHIM"' EXIT
mkdir "$SHIM/moe2edge"
for f in "$ROOT"/moe2edge/*.py; do ln -s "$f" "$SHIM/moe2edge/"; done
for sub in teacher student kernels targets compile data; do
    [ -d "$ROOT/$sub" ] && ln -s "$ROOT/$sub" "$SHIM/moe2edge/$sub"
done
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET MOE2EDGE_KERNELS

# -P: do not put the cwd first on sys.path, where the bare moe2edge/ (without kernels/) would shadow
# the shim. pytest inserts the rootdir itself, so it is started from Python after moe2edge is imported.
"$PY" -P -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" || exit 1
echo "== numerics: pytest -m gpu tests/test_kernels.py"
"$PY" -P -c "
import sys, moe2edge.kernels as k, pytest
print('moe2edge.kernels from', k.__file__, flush=True)
sys.exit(pytest.main(['-q', '-m', '${PYTEST_MARK:-gpu}', 'tests/test_kernels.py', '-p', 'no:cacheprovider', '-rs']))
"
rc_test=$?
echo "== benchmark: bench/moe_kernels.py"
"$PY" -P bench/moe_kernels.py "$@"
rc_bench=$?
echo "== pytest rc=$rc_test, bench rc=$rc_bench"
exit $(( rc_test != 0 || rc_bench != 0 ))
