#!/usr/bin/env bash
# Fault-injection suite (tests/chaos.rs): kill -9 of the agent during jobs,
# a Docker engine restart mid-run, the state filesystem filled to 100 %, the
# FUSE stand-in killed, the engine frozen with SIGSTOP, kill -9 of the agent
# while the images of its jobs are pulled from a local registry. Prints one table row
# per scenario; exits non-zero when a job was lost or ran twice, or a
# scenario broke its promise. It stops and freezes the host's Docker engine:
# run nothing else against that engine meanwhile.
#   scripts/chaos.sh          short mode (what scripts/test.sh runs)
#   scripts/chaos.sh long     the full sizes (200 jobs, ten kills, ...)
#   scripts/chaos.sh short fuse-killed   one scenario (kill-9, engine-restart,
#                             state-full, fuse-killed, engine-frozen, pulls-kill-9)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
mode=${1:-short}
only=${2:-}
case $mode in
  short | long) ;;
  *)
    echo "usage: scripts/chaos.sh [short|long]" >&2
    exit 64
    ;;
esac
scripts/prepare-host.sh >/dev/null
if [[ -d $HOME/.cargo/bin && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi

echo "instance-agent fault injection ($mode), $(date -u +%Y-%m-%d), $(nproc) cores, docker $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
cargo test --quiet --all-features --test chaos -- "$mode" $only
