#!/usr/bin/env bash
# After the test suite: fails if any secret a test registered (through
# tests/common `secret()` / `register_secrets()`, listed in secrets.list)
# appears in any file captured from the agents the tests started: each
# agent's log (audit lines included) and its logs dir (setup logs, mount
# logs and output), kept per agent under the directory below.
#
# Usage: scripts/check-test-logs.sh [dir]
#   dir defaults to $INSTANCE_AGENT_TEST_LOGS, else target/test-logs.
# Prints each offending file with the id of the secret (the test source line
# that registered it), never the secret itself.
#
# The image tests (tests/images.rs) register each registry's password and the
# per-job token of JobSpec.registry_auth (tests/common/registry.rs) and keep
# the registry's own log beside the agent's; when they ran (a captured
# directory images-*) but neither secret is registered, the sweep would prove
# nothing about them, and that fails too.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dir=${1:-${INSTANCE_AGENT_TEST_LOGS:-$repo_root/target/test-logs}}
list=$dir/secrets.list

if [[ ! -s $list ]]; then
  echo "[check-test-logs] no test secret registered in $list: nothing to check"
  exit 0
fi

declare -A id_of
while IFS=$'\t' read -r id value; do
  [[ -n $value ]] || continue
  if [[ -n ${id_of[$value]:-} ]]; then
    id_of[$value]+=", $id"
  else
    id_of[$value]=$id
  fi
done <"$list"

patterns=$(mktemp)
matches=$(mktemp)
trap 'rm -f "$patterns" "$matches"' EXIT
cut -f2- "$list" | grep -v '^$' | sort -u >"$patterns"

# One pass over every captured file for every secret (fixed strings, binary
# files read as text). Output: "<file>\0<the match>\n"; the match only
# serves to find its id and is never printed.
status=0
grep -rFaoZ -f "$patterns" --exclude=secrets.list -- "$dir" >"$matches" || status=$?
if ((status > 1)); then
  echo "[check-test-logs] grep failed (status $status) while reading $dir" >&2
  exit 2
fi
found=$(while IFS= read -r -d '' file && IFS= read -r match; do
  printf '%s: secret registered at %s\n' "$file" "${id_of[$match]:-<unknown id>}"
done <"$matches" | sort -u)

# The registry password and the per-job token: one registering line each.
if compgen -G "$dir/images-*" >/dev/null; then
  registry_ids=$(cut -f1 "$list" | grep -o 'tests/common/registry.rs:[0-9]*' | sort -u | wc -l)
  if ((registry_ids < 2)); then
    echo "[check-test-logs] FAILED: the image tests ran but the registry password and the per-job token are not both registered in $list" >&2
    exit 1
  fi
fi

files=$(find "$dir" -type f ! -name secrets.list | wc -l)
secrets=$(wc -l <"$patterns")
if [[ -n $found ]]; then
  echo "[check-test-logs] FAILED: a test secret appears in a captured log:" >&2
  echo "$found" >&2
  exit 1
fi
echo "[check-test-logs] ok: none of $secrets test secrets in $files captured files under $dir"
