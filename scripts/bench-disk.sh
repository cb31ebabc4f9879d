#!/usr/bin/env bash
# Disk guard benchmark (benches/disk_alerts.rs, also part of scripts/bench.sh):
# (1) alert latency, from the moment a tmpfs crosses the critical level
# (fallocate returns) to the moment a WatchDiskAlerts subscriber receives the
# alert, over repeated crossings at random phases of the sampling interval;
# (2) the agent's CPU, RSS and threads while it samples ten extra tmpfs
# filesystems (plus the default watch list).
#
# Usage: scripts/bench-disk.sh [CROSSINGS (default 20)] [CPU_SECONDS (default 60)]
# INTERVAL_MS overrides disk.interval_ms (default 1000). Needs root (tmpfs
# mounts). Builds the release binary. Prints the figures as table rows.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
export DISK_CROSSINGS=${1:-20}
export DISK_CPU_SECONDS=${2:-60}
if [[ -n ${INTERVAL_MS:-} ]]; then
  export DISK_INTERVAL_MS=$INTERVAL_MS
fi
exec scripts/bench.sh disk_alerts
