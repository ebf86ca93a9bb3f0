#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 600), one after another at
# the lowest CPU priority, on the corpus kept in the repository (fuzz/corpus/<target>/), then
# minimizes that corpus (cargo fuzz cmin). Needs a nightly toolchain and cargo-fuzz
# (`cargo install cargo-fuzz`). Crashes are left in fuzz/artifacts/<target>/.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-600}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
target_dir="${CARGO_TARGET_DIR:-target}/fuzz"
nice -n 19 cargo +nightly fuzz build -O --target-dir "$target_dir"
mkdir -p logs
status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="logs/$t.log"
    echo "== $t: ${secs}s"
    if ! nice -n 19 cargo +nightly fuzz run -O --target-dir "$target_dir" "$t" "corpus/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 >"$log" 2>&1; then
        echo "!! $t: the fuzzer stopped with a finding, see $log and artifacts/$t/"
        status=1
    fi
    # (After a finding there is no "Done" line: the counts may be missing.)
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
    took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' | tail -1 || true)
    echo "   $t: ${runs:-?} executions in ${took:-?} s"
    nice -n 19 cargo +nightly fuzz cmin -O --target-dir "$target_dir" "$t" "corpus/$t" >>"$log" 2>&1 || true
    echo "   corpus: $(find "corpus/$t" -type f | wc -l) files, $(du -sh "corpus/$t" | cut -f1)"
done
exit $status
