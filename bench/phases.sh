# The time-boxed phases of bench/gpu_check.sh and bench/cpu_check.sh (sourced): the caller sets
# BUDGET (seconds in all), START (date +%s at its start) and LOG (the file every phase writes to).

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# phase NAME MAX_SECONDS MIN_SECONDS_LEFT COMMAND...: runs COMMAND under timeout min(MAX, left)
phase() {
    local name=$1 max=$2 need=$3; shift 3
    local l; l=$(left)
    if (( l < need )); then
        echo "== $name: skipped, ${l} s of the budget left (needs ${need})" >> "$LOG"
        return 0
    fi
    local t=$(( max < l ? max : l )) t0; t0=$(date +%s)
    echo "== $name (timeout ${t} s): $*" >> "$LOG"
    timeout --kill-after=10 "$t" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "== $name: exit ${rc}$( ((rc == 124)) && echo ' (timed out)') after $(( $(date +%s) - t0 )) s" >> "$LOG"
    return 0
}
