#!/usr/bin/env bash
# Benchmarks: builds the release binary and runs every bench binary, printing
# one table of `figure | value` rows with the date and the machine. Figures
# are reported, never asserted (machines are shared and noisy). Every bench
# agent runs in a temp dir with its metrics on a port of the kernel's choosing
# (never the default 9464), so it runs beside an installed agent.
#   scripts/bench.sh                        all benches (about 6 minutes)
#   scripts/bench.sh footprint disk_alerts  some (footprint, jobs, grpc_load,
#                                           disk_alerts, images, apps)
# What each covers: footprint = start to READY (empty store and 10,000
# finished jobs), idle RSS and CPU, RSS with 10,000 stored jobs, binary size;
# jobs = throughput against the docker CLI, overhead per job, RSS with 10,000
# jobs queued; grpc_load = GetStatus throughput and latency over the Unix
# socket; disk_alerts = disk alert latency (needs root); images = 8 jobs of
# different ~300 MiB images on 1 slot through the agent (prefetch) against
# `docker pull && docker run --rm` in turn, 4 jobs sharing one image (blob
# fetches at the registry), SubmitJob to RUNNING for a cached image (needs
# docker-registry and about 5 GiB of free disk; about 5 minutes); apps =
# DeployApp to READY cold and warm against `docker run -d -p` to the first
# HTTP answer, health path answering to READY, crash to serving again, agent
# CPU per probe and RSS with 10 apps (about 2 minutes).
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
  benches=(grpc_load jobs disk_alerts images apps footprint)
fi
# Built before anything is measured, so that compiling never overlaps a run.
for bench in "${benches[@]}"; do
  cargo bench --quiet --no-run --bench "$bench" 2>/dev/null
done

echo "instance-agent benchmarks, $(date -u +%Y-%m-%d), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r), docker $(docker version --format '{{.Server.Version}}' 2>/dev/null), load average $(cut -d' ' -f1-3 /proc/loadavg) at the start"
echo
echo "| figure | value |"
echo "|---|---|"
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
failed=0
for bench in "${benches[@]}"; do
  if ! cargo bench --quiet --bench "$bench" 2>"$errors" | sed -n 's/^\(.*\) | \(.*\)$/| \1 | \2 |/p'; then
    echo "| $bench | FAILED (its errors follow the table on stderr) |"
    { echo "--- $bench:"; tail -n 20 "$errors"; } >&2
    failed=1
  fi
done
if [[ " ${benches[*]} " == *" footprint "* ]]; then
  scripts/systemd-check.sh --score-only | sed -n 's/^\(.*\) | \(.*\)$/| \1 | \2 |/p'
fi
exit "$failed"
