#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 20), starting from
# the committed seeds (<crate>/fuzz/seeds/<target>/) plus whatever earlier
# runs found (<crate>/fuzz/corpus/<target>/, not committed), and fails on
# the first crash, leak or timeout (libFuzzer's artifact is kept in
# <crate>/fuzz/artifacts/<target>/); one input running over 10 s is a
# hang. Prints executions per target.
#
#   scripts/fuzz.sh            # 20 s per target (what `make test` runs)
#   scripts/fuzz.sh 600        # a long run (`make fuzz` uses 60)
#   FUZZ_ONLY=nbd_server scripts/fuzz.sh 60
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
case "$seconds" in
  ''|*[!0-9]*|0) echo "usage: scripts/fuzz.sh [SECONDS > 0] (got \`$seconds\`)" >&2; exit 2 ;;
esac
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz needs nightly flags; the one toolchain here is stable.
export RUSTC_BOOTSTRAP=1
targets=(
  "abi decode"
  "sd-storage-crypt nbd_server"
  "sd-storage-crypt volume_header"
  "sd-storage-crypt auth_volume"
  "sd-checkpoint checkpoint_stream"
  "sd-hsm client_frames"
  "udom0 attestation_parsers"
  "sd-introspect guest_memory"
  "host-tools/luks luks_header"
)
summary=()
for t in "${targets[@]}"; do
  read -r crate target <<<"$t"
  if [ -n "${FUZZ_ONLY:-}" ] && [ "$FUZZ_ONLY" != "$target" ]; then continue; fi
  corpus="fuzz/corpus/$target"
  seeds="fuzz/seeds/$target"
  mkdir -p "$crate/$corpus" "$crate/$seeds"
  echo "fuzz: $crate/$target for ${seconds} s…"
  log=$(mktemp)
  if ! (cd "$crate" && cargo fuzz run "$target" "$corpus" "$seeds" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1) >"$log" 2>&1; then
    tail -40 "$log"
    echo "fuzz: $crate/$target FAILED (the crashing input is under $crate/fuzz/artifacts/$target/)" >&2
    rm -f "$log"
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || echo '?')
  summary+=("$(printf '%-34s %10s execs in %3s s  (%5s execs/s, coverage %s)' "$crate/$target" "$runs" "$seconds" \
    "$([ "$runs" = '?' ] && echo '?' || echo $((runs / seconds)))" "$cov")")
  rm -f "$log"
done
echo "fuzz: no crash"
printf '  %s\n' "${summary[@]}"
