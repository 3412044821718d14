#!/usr/bin/env bash
# Builds the fuzz targets with coverage instrumentation (stable toolchain: SanitizerCoverage via
# `-C passes`/`-C llvm-args`, libFuzzer from `libfuzzer-sys`) and runs them.
#
#   fuzz/run.sh build                 build every target
#   fuzz/run.sh smoke [SECONDS]       each target for SECONDS (default 5) from the seeds: CI
#   fuzz/run.sh run TARGET SECONDS    one target, growing fuzz/corpus/TARGET (not checked in)
#   fuzz/run.sh replay TARGET FILE..  run the target on the given inputs (reproduce a crash)
#
# Crashes are written to fuzz/artifacts/TARGET/ and make the command fail.
set -euo pipefail
cd "$(dirname "$0")"

targets=(policy_compile path_normalize sidecar_config pem_load csr_parse)
triple=$(rustc -vV | sed -n 's/^host: //p')
# --target keeps the instrumentation off build scripts and proc macros (they would not link).
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR_FUZZ:-$PWD/target}
bin=$CARGO_TARGET_DIR/$triple/release

build() { cargo build --release --locked --target "$triple" --bins; }

# fuzz TARGET SECONDS [libFuzzer args..]: new inputs go to corpus/TARGET, seeds are read only.
fuzz() {
  local t=$1 secs=$2
  shift 2
  mkdir -p "corpus/$t" "artifacts/$t"
  local dict=()
  [[ -f dicts/$t.dict ]] && dict=(-dict="dicts/$t.dict")
  "$bin/$t" "corpus/$t" "seeds/$t" "${dict[@]}" -max_total_time="$secs" -max_len=8192 \
    -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="artifacts/$t/" "$@"
}

case ${1:-smoke} in
  build) build ;;
  smoke)
    build
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    for t in "${targets[@]}"; do
      printf '\n==> fuzz smoke: %s (%ss)\n' "$t" "${2:-5}"
      if fuzz "$t" "${2:-5}" >"$log" 2>&1; then
        grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|stat::(number_of_executed_units|peak_rss_mb))' "$log" || true
      else
        tail -n 60 "$log"
        echo "fuzz target $t failed: the input is in fuzz/artifacts/$t/; reproduce with fuzz/run.sh replay $t FILE" >&2
        exit 1
      fi
    done
    ;;
  run) build && fuzz "$2" "$3" ;;
  replay)
    t=$2
    shift 2
    build && "$bin/$t" "$@"
    ;;
  *) echo "usage: fuzz/run.sh build | smoke [SECONDS] | run TARGET SECONDS | replay TARGET FILE.." >&2; exit 2 ;;
esac
