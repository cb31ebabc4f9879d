#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a fixed time (not part of the
# normal test run).
#   scripts/fuzz.sh                 each target for $FUZZ_SECONDS (default 60)
#   scripts/fuzz.sh job_spec 300    one target for 300 s
#
# Seeds are read from fuzz/corpus/<target>/ (kept in the repo, never written
# here); what the fuzzer finds goes to target/fuzz-corpus/<target>/, crashes
# to fuzz/artifacts/<target>/. To keep a new seed, copy it into fuzz/corpus.
#
# Toolchain: libFuzzer needs `-Zsanitizer`, i.e. a nightly compiler. The
# script uses `+nightly` when rustup has it; otherwise the stable compiler
# with RUSTC_BOOTSTRAP=1 (which unlocks the same flags). cargo-fuzz is
# installed from crates.io when missing.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root/fuzz"
if [[ -d $HOME/.cargo/bin && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi

readonly ALL_TARGETS=(config_parse job_spec path_confine mount_yaml)
seconds=${FUZZ_SECONDS:-60}
targets=("${ALL_TARGETS[@]}")
if (($# >= 1)); then targets=("$1"); fi
if (($# >= 2)); then seconds=$2; fi

say() { printf '[fuzz] %s\n' "$*"; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  say "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

toolchain=()
if rustup run nightly rustc --version >/dev/null 2>&1; then
  toolchain=(+nightly)
  say "toolchain: $(rustup run nightly rustc --version)"
else
  export RUSTC_BOOTSTRAP=1
  say "toolchain: $(rustc --version) with RUSTC_BOOTSTRAP=1 (no nightly installed)"
fi

failed=()
for target in "${targets[@]}"; do
  work="$repo_root/target/fuzz-corpus/$target"
  mkdir -p "$work"
  say "$target: ${seconds}s (seeds: fuzz/corpus/$target, new inputs: $work)"
  if cargo "${toolchain[@]}" fuzz run "$target" "$work" "corpus/$target" -- \
    -max_total_time="$seconds" -print_final_stats=1 2>"$work.log"; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$work.log" | grep -o '[0-9]*$' || echo '?')
    say "$target: ok, $runs runs"
  else
    failed+=("$target")
    say "$target: FAILED; see $work.log and fuzz/artifacts/$target/"
    tail -n 30 "$work.log" >&2
  fi
  # path_confine builds its symlink tree here (libFuzzer exits without
  # running destructors, so the target cannot remove it itself).
  rm -rf "${TMPDIR:-/tmp}"/instance-agent-fuzz-*
done

if ((${#failed[@]})); then
  say "failed: ${failed[*]}"
  exit 1
fi
say "all targets ran ${seconds}s without a crash"
