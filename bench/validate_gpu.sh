#!/usr/bin/env bash
# Full GPU validation in one call: the test suite on CUDA (bf16 included), a pytest-benchmark
# smoke run, then the benchmark suite; results and logs land in one folder.
#
#   bash bench/validate_gpu.sh [OUT_DIR]
#   bash bench/validate_gpu.sh --smoke [OUT_DIR]   # dry run, CPU allowed: --smoke for both benchmark stages
#
# OUT_DIR defaults to $OUT when set (the lent GPU machine provides it), else out/validate-<date>.
# It receives (at most 8 files, none nested, so a GPU machine's $OUT brings them all back):
#   validate.log          everything printed, with the machine, versions and per-stage times
#   tests.xml             JUnit report of the test suite on CUDA
#   pytest-benchmark.json pytest-benchmark's data for the smoke run (our kernels' cases)
#   suite-*.json          the results file of `python -m tritongpt.bench` (DESIGN.md format)
#   REPORT.md             that file rendered; plots.tar.gz, its PNG plots
#
# Budget (wall clock caps, each stage is killed at its cap and the next one runs):
#   tests TEST_TIMEOUT=180 s, smoke PYTEST_BENCH_TIMEOUT=40 s, benchmark BENCH_TIMEOUT=270 s:
#   490 s of stages plus about 30 s of set-up and rendering, so the script ends within about
#   9 minutes: inside one 10-minute command on the lent GPU machine and, with its few minutes of
#   start-up, inside the 15 minutes of device time a session gets. (Estimates, not yet timed on a
#   GPU; the benchmark saves its results file as it goes, so a capped run keeps what it measured.)
#   BENCH_ARGS (default --quick, or --smoke for a dry run) is passed to `python -m tritongpt.bench`;
#   set BENCH_ARGS="" for the full run (longer: run it on its own). TEST_ARGS (default: none, the
#   whole suite) and PYTEST_BENCH_ARGS (default -k triton) narrow the two pytest stages.
# Without an installed tritongpt (a bare copy of the tree), it is installed to /tmp/site first.
# Liger-Kernel, if its wheel is in .whl/ (carried to the machine), is installed to /tmp/site
# first and becomes the extra "liger" baseline; without it the run goes on without Liger.
# Exit status: 0 when every stage passed, else 1 (the log says which failed).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=()
if [ "${1:-}" = --smoke ]; then SMOKE=(--smoke); shift; fi
OUT_DIR="${1:-${OUT:-out/validate-$(date -u +%Y%m%dT%H%M%S)}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/validate.log"
PY="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-180}"
PYTEST_BENCH_TIMEOUT="${PYTEST_BENCH_TIMEOUT:-40}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}"
BENCH_ARGS="${BENCH_ARGS-${SMOKE[0]:---quick}}"
read -r -a TEST_ARGS <<<"${TEST_ARGS:-}"
read -r -a PYTEST_BENCH_ARGS <<<"${PYTEST_BENCH_ARGS:--k triton}"
export PYTHONUNBUFFERED=1
WORK="$(mktemp -d)"
failed=()

stage() {  # stage NAME CAP COMMAND...: run with a wall-clock cap, log its time and status
  local name=$1 cap=$2 start=$SECONDS rc
  shift 2
  echo "== $name (cap ${cap} s): $*"
  timeout --signal=TERM --kill-after=10 "$cap" "$@"
  rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s$([ $rc -eq 124 ] && echo ', cut at its cap')"
  [ $rc -eq 0 ] || failed+=("$name")
}

{
  echo "== validate_gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && echo "installed from .whl/: $(ls .whl)"
  fi
  if ! "$PY" -c "import tritongpt" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/site . \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" && echo "installed tritongpt to /tmp/site"
  fi
  nvidia-smi || echo "nvidia-smi: not found"
  "$PY" - <<'EOF'
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
      f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")
try:
    import liger_kernel  # noqa: F401
    from importlib.metadata import version
    print(f"liger-kernel {version('liger-kernel')}")
except ImportError:
    print("liger-kernel: not installed (no liger baseline)")
EOF
  # xdist spreads the many Triton compilations of the test suite over the CPU cores
  xdist=()
  "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
  stage tests "$TEST_TIMEOUT" "$PY" -m pytest -q -ra --durations=15 "${xdist[@]}" \
    --junitxml "$OUT_DIR/tests.xml" "${TEST_ARGS[@]}"
  stage pytest-benchmark "$PYTEST_BENCH_TIMEOUT" "$PY" -m pytest bench --benchmark-only -q "${SMOKE[@]}" \
    "${PYTEST_BENCH_ARGS[@]}" --benchmark-json "$OUT_DIR/pytest-benchmark.json"
  # shellcheck disable=SC2086  (BENCH_ARGS is a list of flags)
  stage benchmark "$BENCH_TIMEOUT" "$PY" -m tritongpt.bench $BENCH_ARGS --out-dir "$WORK"
  if compgen -G "$WORK/*.json" >/dev/null; then
    cp "$WORK"/*.json "$OUT_DIR"/
    # rendered here (not by the suite alone) so a benchmark cut at its cap still gets its report
    # REPORT.md links plots/*.png: unpack plots.tar.gz beside it
    "$PY" -m tritongpt.bench.report "$WORK"/*.json --out "$WORK/report/REPORT.md" --plots-dir "$WORK/report/plots" \
      && cp "$WORK/report/REPORT.md" "$OUT_DIR"/ && tar -czf "$OUT_DIR/plots.tar.gz" -C "$WORK/report" plots
  else
    echo "no results file was written"
  fi
  if [ ${#failed[@]} -eq 0 ]; then echo "== all stages passed"; else echo "== failed: ${failed[*]}"; fi
  echo "== results in $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
  [ ${#failed[@]} -eq 0 ]
} 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
rm -rf "$WORK"
exit "$rc"
