# Sourced by the table recipes (digits-table.sh, digits-cond-table.sh): where o2m, its Python and the docs are,
# the budgets shared by every row, and `o2m`, which runs one command and logs its wall time.
# Expects HERE (the recipes folder) and the run directory as $1 (default $DEFAULT_WORK); leaves the shell in it.
O2M=${O2M:-o2m}
case "$O2M" in /*) ;; */*) O2M="$PWD/$O2M" ;; esac
# The report writers run on the Python that runs o2m (the venv's, under `make table`).
PY=${O2M_PYTHON:-$(dirname "$(command -v "$O2M")")/python}
[ -x "$PY" ] || PY=python3
DOCS=${O2M_DOCS:-$HERE/../docs}
case "$DOCS" in /*) ;; *) DOCS="$PWD/$DOCS" ;; esac
WORK=${1:-$DEFAULT_WORK}
N=${O2M_N:-1000}
STEPS=${O2M_STEPS:-400}
RHO=${O2M_RHO:-0.2}  # (O2M_STEPS, O2M_RHO, O2M_N: smaller budgets for a quick check of the recipe itself)
TRAIN="--steps $STEPS --batch-size 64 --lr 5e-4 --seed 0 --force"
mkdir -p "$WORK" "$DOCS"
cd "$WORK"
git -C "$HERE" describe --always --dirty > commit.txt 2>/dev/null || echo unknown > commit.txt  # what ran ("-dirty": uncommitted edits)

# Runs one o2m command, logging its wall time and the command as a user types it (to $LOG).
o2m() {
  local t0
  echo "+ o2m $*" >&2
  t0=$(date +%s%N)
  "$O2M" "$@"
  printf '%s\t%s\n' "$(( ($(date +%s%N) - t0) / 1000000 ))" "o2m $*" >> "$LOG"
}

# Runs the recipe's lane_a and lane_b at once, each in a subshell that stops at its first error (lane_b may watch
# $LANE_A), waits for both, and records how the commands shared the machine ($2) in parallel.txt; $1 names the
# recipe in the error.
run_lanes() {
  ( set -e; lane_a ) & LANE_A=$!
  ( set -e; lane_b ) & LANE_B=$!
  local failed=0
  wait "$LANE_A" || failed=1
  wait "$LANE_B" || failed=1
  [ "$failed" = 0 ] || { echo "$1: a lane failed (see above)" >&2; exit 1; }
  unset OMP_NUM_THREADS MKL_NUM_THREADS
  printf '%s\n' "$2" > parallel.txt
}
