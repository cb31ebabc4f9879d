#!/usr/bin/env bash
# Figures for file share mounts, with the blobfuse2 stand-in (a real FUSE
# mount of a local directory; real blobfuse2 adds its own start-up and Azure
# round trips):
#   1. time from the Mount RPC to MOUNTED (as the CLI sees it, so it includes
#      the CLI's own start, about 10 ms),
#   2. time from SIGKILL of blobfuse2 to MOUNTED again (detection + repair),
#      at the configured health interval,
#   3. the agent's RSS with 0 and N mounts.
# Usage: scripts/bench-mounts.sh [mounts=50] [kills=5]; HEALTH_INTERVAL=10 by default.
# Prints a summary; never fails on slow numbers (machines are noisy).
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
if [[ -d $HOME/.cargo/bin && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi
N=${1:-50}
KILLS=${2:-5}
INTERVAL=${HEALTH_INTERVAL:-10}

cargo build --release --quiet
cargo build --release --quiet --features test-util --bin blobfuse2-standin
BIN="$repo_root/target/release/instance-agent"
DIR=$(mktemp -d /tmp/instance-agent-bench-mounts.XXXXXX)
SOCKET="$DIR/agent.sock"
AGENT_PID=
mkdir -p "$DIR/mnt" "$DIR/storage/data" "$DIR/bin"
cat >"$DIR/bin/blobfuse2" <<WRAPPER
#!/bin/sh
STANDIN_STORAGE_ROOT="$DIR/storage" exec "$repo_root/target/release/blobfuse2-standin" "\$@"
WRAPPER
chmod +x "$DIR/bin/blobfuse2"
( umask 077; printf 'YmVuY2gta2V5' >"$DIR/key" )

cleanup() {
  if [[ -n $AGENT_PID ]]; then kill -TERM "$AGENT_PID" 2>/dev/null || true; wait "$AGENT_PID" 2>/dev/null || true; fi
  local mount pid
  for mount in $(awk -v d="$DIR/mnt/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo); do
    fusermount3 -u -z "$mount" 2>/dev/null || true
  done
  for pid in $(pgrep -f "blobfuse2-standin mount $DIR/mnt/" || true); do kill -KILL "$pid" 2>/dev/null || true; done
  rm -rf "$DIR" || true
}
trap cleanup EXIT

cat >"$DIR/config.toml" <<TOML
[agent]
socket = "$SOCKET"
state_dir = "$DIR/state"
logs_dir = "$DIR/logs"
runtime_dir = "$DIR/run"
[mounts]
blobfuse2_path = "$DIR/bin/blobfuse2"
allowed_roots = ["$DIR/mnt"]
cache_root = "$DIR/cache"
health_interval_seconds = $INTERVAL
TOML
NO_COLOR=1 "$BIN" serve --config "$DIR/config.toml" 2>"$DIR/agent.log" &
AGENT_PID=$!
for _ in $(seq 1 200); do [[ -S $SOCKET ]] && break; sleep 0.05; done
sleep 1
AGENT=("$BIN" --socket "$SOCKET")
rss() { awk '/VmRSS/ {print $2}' "/proc/$AGENT_PID/status"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
json_field() { grep -o "\"$1\": *[^,}]*" | head -n 1 | sed 's/.*: *//; s/"//g'; }
stats() { sort -n | awk '{a[NR]=$1} END {printf "min %d ms, median %d ms, max %d ms (n=%d)", a[1], a[int((NR+1)/2)], a[NR], NR}'; }

rss0=$(rss)
: >"$DIR/mount.ms"
for i in $(seq 1 "$N"); do
  t0=$(now_ms)
  "${AGENT[@]}" mounts mount "m$i" --account benchacct --container data \
    --path "$DIR/mnt/m$i" --account-key-file "$DIR/key" >/dev/null
  echo $(( $(now_ms) - t0 )) >>"$DIR/mount.ms"
done
sleep $(( INTERVAL * 2 + 1 ))
rssn=$(rss)

: >"$DIR/repair.ms"
for k in $(seq 1 "$KILLS"); do
  pid=$({ "${AGENT[@]}" --json mounts list || true; } | tr -d '\n' | tr '{' '\n' | grep '"name": "m1"' | json_field pid)
  t0=$(now_ms)
  kill -KILL "$pid"
  while true; do
    # `mounts list` exits 1 while a mount is not up.
    line=$({ "${AGENT[@]}" --json mounts list || true; } | tr -d '\n' | tr '{' '\n' | grep '"name": "m1"')
    [[ $(json_field state <<<"$line") == MOUNT_STATE_MOUNTED && $(json_field remountCount <<<"$line") == "$k" ]] && break
    sleep 0.05
  done
  echo $(( $(now_ms) - t0 )) >>"$DIR/repair.ms"
  # Kill at a random point of the next health interval.
  sleep "$((RANDOM % INTERVAL)).$((RANDOM % 10))"
done
# Repair alone (STALE to MOUNTED, from the agent's log): detection excluded.
sed 's/\x1b\[[0-9;]*m//g' "$DIR/agent.log" |
  grep 'mount state changed mount=m1 state="\(stale\|mounted\)"' |
  awk '{split(substr($1, 12, 15), t, ":"); s = t[1] * 3600 + t[2] * 60 + t[3]}
       /state="stale"/ {stale = s} /state="mounted"/ && stale {printf "%d\n", (s - stale) * 1000; stale = 0}' \
  >"$DIR/fix.ms"

echo "== file share mounts ($(date -u +%F), $(nproc) cores, $(uname -r), health interval ${INTERVAL} s)"
echo "Mount RPC to MOUNTED (CLI wall time): $(stats <"$DIR/mount.ms")"
echo "SIGKILL of blobfuse2 to MOUNTED again (detection + repair): $(stats <"$DIR/repair.ms")"
echo "STALE to MOUNTED (repair alone): $(stats <"$DIR/fix.ms")"
echo "agent RSS: ${rss0} KiB with 0 mounts, ${rssn} KiB with $N mounts"
