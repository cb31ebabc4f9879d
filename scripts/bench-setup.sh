#!/usr/bin/env bash
# Figures for setup scripts (README "Setup scripts"): the cost of running a
# script through the agent compared with `bash script`, and the agent's memory
# and CPU while a script prints 100 MB. Builds the release binary, starts an
# agent on a temp dir, measures, stops it. Usage: scripts/bench-setup.sh [RUNS]
set -euo pipefail

runs=${1:-50}
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
if [[ -d $HOME/.cargo/bin && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi
cargo build --release --quiet
BIN="$repo_root/target/release/instance-agent"
NOOP="$repo_root/scripts/bench/setup-noop.sh"

dir=$(mktemp -d /tmp/instance-agent-bench.XXXXXX)
pid=
# Never fails (see scripts/build-deb.sh): the script's status is its own.
cleanup() {
  if [[ -n $pid ]]; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$dir" || true
}
trap cleanup EXIT
cat >"$dir/config.toml" <<TOML
[agent]
socket = "$dir/agent.sock"
state_dir = "$dir/state"
logs_dir = "$dir/logs"
runtime_dir = "$dir/run"
[setup]
keep_runs = 10000
TOML
"$BIN" serve --config "$dir/config.toml" 2>"$dir/agent.log" &
pid=$!
for _ in $(seq 1 200); do [[ -S $dir/agent.sock ]] && break; sleep 0.05; done
sleep 0.5
AGENT=("$BIN" --socket "$dir/agent.sock")

now() { date +%s%N; }
kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

echo "== $(date -u +%Y-%m-%d), $(nproc) CPUs, $(uname -r), $runs runs each"
echo "agent idle: VmRSS $(kib "$pid" VmRSS) KiB"

t0=$(now)
for _ in $(seq 1 "$runs"); do bash "$NOOP"; done
t1=$(now)
direct_ms=$(( (t1 - t0) / runs / 1000 ))
echo "bash script directly:                      $(( direct_ms / 1000 )).$(printf %03d $(( direct_ms % 1000 ))) ms per run"

t0=$(now)
for _ in $(seq 1 "$runs"); do "${AGENT[@]}" setup run --follow "$NOOP" >/dev/null 2>&1; done
t1=$(now)
cli_ms=$(( (t1 - t0) / runs / 1000 ))
echo "CLI 'setup run --follow' end to end:       $(( cli_ms / 1000 )).$(printf %03d $(( cli_ms % 1000 ))) ms per run"

# Agent side: started_at -> finished_at of the runs just made (supervisor
# exec, script, reports, log finish, fsynced record).
"${AGENT[@]}" --json setup list --limit "$runs" | python3 -c '
import json, sys
from datetime import datetime
def t(s): return datetime.fromisoformat(s.replace("Z", "+00:00"))
runs = json.load(sys.stdin)["runs"]
d = sorted((t(r["finishedAt"]) - t(r["startedAt"])).total_seconds() * 1000 for r in runs)
print(f"agent started_at -> finished_at:           median {d[len(d)//2]:.1f} ms, p90 {d[int(len(d)*0.9)]:.1f} ms")
'

ticks_before=$(cpu_ticks "$pid")
hz=$(getconf CLK_TCK)
t0=$(now)
"${AGENT[@]}" setup run --follow -c "yes '$(printf '%099d' 0)' | head -c 100000000" >/dev/null 2>&1 &
cli=$!
sup_rss=0
while kill -0 "$cli" 2>/dev/null; do
  for s in $(pgrep -f '__setup-supervisor' || true); do
    r=$(kib "$s" VmRSS 2>/dev/null || echo 0)
    (( r > sup_rss )) && sup_rss=$r
  done
  sleep 0.05
done
t1=$(now)
ticks_after=$(cpu_ticks "$pid")
echo "100 MB of output: $(( (t1 - t0) / 1000000 )) ms, agent CPU $(( (ticks_after - ticks_before) * 1000 / hz )) ms,"\
  "agent VmHWM $(kib "$pid" VmHWM) KiB, VmRSS after $(kib "$pid" VmRSS) KiB, supervisor VmRSS ${sup_rss} KiB"
last_log=$(ls -t "$dir/logs/setup/"*.log | head -n 1)
echo "its log file: $(stat -c %s "$last_log") bytes (head 4 MiB + tail 1 MiB kept)"
