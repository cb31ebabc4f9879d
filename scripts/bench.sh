#!/usr/bin/env bash
# Benchmarks: builds the release binary and runs every bench binary, printing
# one table of `name | value` rows with the date and the machine. Figures are
# reported, never asserted (machines are shared and noisy).
#   scripts/bench.sh            all benches
#   scripts/bench.sh footprint  one bench (footprint, jobs, grpc_load, ...)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
scripts/prepare-host.sh >/dev/null
if [[ -d $HOME/.cargo/bin && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi

cargo build --release --quiet
benches=("$@")
if ((${#benches[@]} == 0)); then
  benches=(footprint jobs grpc_load)
fi

echo "instance-agent benchmarks, $(date -u +%Y-%m-%d), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/{print $2}') GiB, docker $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
echo
echo "| figure | value |"
echo "|---|---|"
for bench in "${benches[@]}"; do
  cargo bench --quiet --bench "$bench" 2>/dev/null | sed -n 's/^\(.*\) | \(.*\)$/| \1 | \2 |/p'
done
if [[ " ${benches[*]} " == *" footprint "* ]]; then
  scripts/systemd-check.sh --score-only | sed -n 's/^\(.*\) | \(.*\)$/| \1 | \2 |/p'
fi
