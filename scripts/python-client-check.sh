#!/usr/bin/env bash
# Proves that proto/ is the whole contract: generates a Python client from
# proto/ alone (grpcio-tools), starts the agent on a temp socket, and calls
# GetStatus, Health and reflection with it. Needs python3 and PyPI; the venv
# is cached under target/.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
venv=target/python-client-venv
if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -c 'import grpc_tools, grpc_health, grpc_reflection' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check grpcio grpcio-tools grpcio-health-checking grpcio-reflection
fi
work=$(mktemp -d)
agent_pid=
# Never fails (see scripts/build-deb.sh): the script's status is its own.
cleanup() {
  if [[ -n $agent_pid ]]; then
    kill "$agent_pid" 2>/dev/null || true
    wait "$agent_pid" 2>/dev/null || true
  fi
  rm -rf "$work" || true
}
trap cleanup EXIT

"$venv/bin/python" -m grpc_tools.protoc -I proto --python_out="$work" --grpc_python_out="$work" \
  proto/instance_agent/v1/*.proto
touch "$work/instance_agent/__init__.py" "$work/instance_agent/v1/__init__.py"

binary=${INSTANCE_AGENT_BIN:-target/debug/instance-agent}
[[ -x $binary ]] || cargo build --quiet
# All defaults (no file at $INSTANCE_AGENT_CONFIG), whatever /etc holds; --state-dir moves the
# other directories under it. The default metrics address, 127.0.0.1:9464, must be free.
INSTANCE_AGENT_CONFIG="$work/absent.toml" \
  "$binary" serve --socket "$work/agent.sock" --state-dir "$work/state" 2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 1 200); do [[ -S $work/agent.sock ]] && break; sleep 0.05; done
PYTHONPATH="$work" "$venv/bin/python" scripts/python-client/check.py "$work/agent.sock"
echo "python client generated from proto/ alone: ok"
