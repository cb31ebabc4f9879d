#!/usr/bin/env bash
# Disk guard benchmark: (1) alert latency, from the moment a filesystem
# crosses a level (fallocate returns) to the moment a WatchDiskAlerts client
# (the CLI's `disk --watch --json`) prints the alert, over repeated crossings
# at random phases of the sampling interval; (2) the agent's CPU and memory
# while it samples ten extra tmpfs filesystems (plus /) every second.
#
# Usage: scripts/bench-disk.sh [CROSSINGS (default 20)] [CPU_SECONDS (default 60)]
# Needs root (tmpfs mounts). Builds the release binary. Prints the figures.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
crossings=${1:-20}
cpu_seconds=${2:-60}
interval_ms=${INTERVAL_MS:-1000}

cargo build --release --quiet
BIN="$repo_root/target/release/instance-agent"

dir=$(mktemp -d /tmp/instance-agent-bench-disk.XXXXXX)
agent_pid=
watch_pid=
cleanup() {
  [[ -n $watch_pid ]] && kill "$watch_pid" 2>/dev/null || true
  if [[ -n $agent_pid ]]; then
    kill -TERM "$agent_pid" 2>/dev/null || true
    wait "$agent_pid" 2>/dev/null || true
  fi
  for m in "$dir"/fs*; do
    mountpoint -q "$m" && umount -l "$m"
  done
  rm -rf "$dir"
}
trap cleanup EXIT

# One 64 MiB filesystem to cross levels on, ten more just to be sampled.
paths=()
for i in $(seq 0 10); do
  mkdir -p "$dir/fs$i"
  mount -t tmpfs -o size=64m "bench-disk-$i" "$dir/fs$i"
  paths+=("\"$dir/fs$i\"")
done
target="$dir/fs0"

cat >"$dir/config.toml" <<TOML
[agent]
socket = "$dir/agent.sock"
state_dir = "$dir/state"
logs_dir = "$dir/logs"
runtime_dir = "$dir/run"
[disk]
interval_ms = $interval_ms
transition_seconds = 0
auto_reclaim = false
critical_free_bytes = 8388608
warning_free_bytes = 16777216
clear_margin_bytes = 2097152
paths = [$(IFS=,; echo "${paths[*]}")]
TOML

"$BIN" serve --config "$dir/config.toml" 2>"$dir/agent.log" &
agent_pid=$!
for _ in $(seq 1 200); do
  [[ -S $dir/agent.sock ]] && break
  sleep 0.05
done
[[ -S $dir/agent.sock ]] || { cat "$dir/agent.log"; echo "agent did not start" >&2; exit 1; }
sleep 2

now_ns() { date +%s%N; }

# --- latency ----------------------------------------------------------------
coproc WATCH { exec "$BIN" --socket "$dir/agent.sock" --json disk --watch; }
watch_pid=$WATCH_PID
# Waits for the next alert on the target with the given new state; prints
# the time it was read.
wait_alert() {
  local want=$1 line
  while IFS= read -r -t 30 line <&"${WATCH[0]}"; do
    if [[ $line == *"\"mountPoint\":\"$target\""* && $line == *"\"newState\":\"$want\""* \
      && $line != *"\"oldState\":\"$want\""* ]]; then
      now_ns
      return 0
    fi
  done
  echo "no $want alert within 30 s" >&2
  return 1
}

latencies=()
for i in $(seq 1 "$crossings"); do
  # A random phase within the sampling interval.
  sleep "0.$(printf '%03d' $((RANDOM % 1000)))"
  start=$(now_ns)
  fallocate -l 58M "$target/fill" # 6 MiB free: below the 8 MiB floor
  end=$(wait_alert DISK_STATE_CRITICAL)
  latencies+=($(((end - start) / 1000000)))
  rm -f "$target/fill"
  wait_alert DISK_STATE_OK >/dev/null
done
kill "$watch_pid" 2>/dev/null || true
watch_pid=

sorted=$(printf '%s\n' "${latencies[@]}" | sort -n)
count=${#latencies[@]}
pick() { sed -n "$1p" <<<"$sorted"; }
p50=$(pick $(((count + 1) / 2)))
p95=$(pick $(((count * 95 + 99) / 100)))
mean=$(($(printf '%s+' "${latencies[@]}")0))
mean=$((mean / count))

# --- CPU and memory ---------------------------------------------------------
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$agent_pid/stat"; }
filesystems=$("$BIN" --socket "$dir/agent.sock" --json disk | grep -c '"mountPoint"' || true)
before=$(cpu_ticks)
sleep "$cpu_seconds"
after=$(cpu_ticks)
cpu_percent=$(awk -v t=$((after - before)) -v hz="$ticks" -v s="$cpu_seconds" \
  'BEGIN { printf "%.2f", t / hz / s * 100 }')
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$agent_pid/status")
threads=$(awk '/Threads/ {print $2}' "/proc/$agent_pid/status")

cat <<REPORT
disk guard benchmark ($(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r))
  alert latency, level crossing -> WatchDiskAlerts client, interval_ms = $interval_ms,
  $count crossings at random phases:
    min $(pick 1) ms   p50 $p50 ms   mean $mean ms   p95 $p95 ms   max $(pick "$count") ms
  agent while sampling $filesystems filesystems every ${interval_ms} ms for ${cpu_seconds} s:
    CPU ${cpu_percent}% of one core   RSS $((rss_kib / 1024)) MiB   threads $threads
REPORT
