#!/usr/bin/env bash
# Checks systemd/instance-agent.service: `systemd-analyze verify` must print
# nothing (it exits 0 even on warnings, so its output is checked too), and
# prints the `systemd-analyze security --offline=true` exposure score.
# Verification runs in a scratch root, since the unit's binaries need not be
# installed on this machine.
#   scripts/systemd-check.sh               verify, then print the score
#   scripts/systemd-check.sh --score-only  print `exposure | N` only
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
unit="$repo_root/systemd/instance-agent.service"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
ln -s usr/bin "$root/bin"
ln -s usr/lib "$root/lib"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
install -m755 /dev/null "$root/usr/bin/instance-agent"
install -m755 /dev/null "$root/usr/bin/kill"
cp "$unit" "$root/etc/systemd/system/"

if [[ ${1:-} != --score-only ]]; then
  out=$(systemd-analyze verify --root="$root" instance-agent.service 2>&1) || { echo "$out"; exit 1; }
  if [[ -n $out ]]; then
    echo "systemd-analyze verify printed warnings:"
    echo "$out"
    exit 1
  fi
  echo "systemd-analyze verify: clean"
fi
score=$(systemd-analyze security --offline=true --root="$root" --no-pager instance-agent.service 2>/dev/null |
  sed -n 's/.*Overall exposure level for instance-agent.service: \([0-9.]*\).*/\1/p')
echo "systemd exposure score (systemd-analyze security --offline=true) | $score"
