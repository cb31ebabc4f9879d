#!/usr/bin/env bash
# Demo: prepare the host, build the release binary, start the agent with a
# local state dir and socket, show it doing its duties through the CLI, and
# stop it cleanly. Each capability adds a step in scripts/demo.d/NN-name.sh,
# sourced in order with "${AGENT[@]}" (the CLI command), $DEMO_DIR and $SOCKET
# set, and may add config in scripts/demo.d/NN-name.toml ($DEMO_DIR and
# $METRICS_PORT are replaced by the demo's directory and metrics port).
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

scripts/prepare-host.sh
if [[ -d $HOME/.cargo/bin && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build the release binary"
cargo build --release --quiet
BIN="$repo_root/target/release/instance-agent"

DEMO_DIR=$(mktemp -d /tmp/instance-agent-demo.XXXXXX)
SOCKET="$DEMO_DIR/agent.sock"
AGENT_PID=
# Never fails (see scripts/build-deb.sh): the script's status is its own.
cleanup() {
  if [[ -n $AGENT_PID ]] && kill -0 "$AGENT_PID" 2>/dev/null; then
    kill -TERM "$AGENT_PID" 2>/dev/null || true
    wait "$AGENT_PID" 2>/dev/null || true
  fi
  if [[ -z ${DEMO_KEEP:-} ]]; then rm -rf "$DEMO_DIR" || true; fi
}
trap cleanup EXIT

# A free loopback port for the metrics endpoint (the default 9464 may belong
# to an agent installed on this machine).
METRICS_PORT=19464
while (exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT") 2>/dev/null; do
  METRICS_PORT=$((METRICS_PORT + 1))
done

cat >"$DEMO_DIR/config.toml" <<TOML
[agent]
socket = "$SOCKET"
state_dir = "$DEMO_DIR/state"
logs_dir = "$DEMO_DIR/logs"
runtime_dir = "$DEMO_DIR/run"
TOML
for snippet in scripts/demo.d/*.toml; do
  [[ -e $snippet ]] || continue
  sed -e "s|\$DEMO_DIR|$DEMO_DIR|g" -e "s|\$METRICS_PORT|$METRICS_PORT|g" "$snippet" >>"$DEMO_DIR/config.toml"
done

step "start the agent ($DEMO_DIR)"
"$BIN" serve --config "$DEMO_DIR/config.toml" 2>"$DEMO_DIR/agent.log" &
AGENT_PID=$!
for _ in $(seq 1 200); do
  [[ -S $SOCKET ]] && break
  sleep 0.05
done
[[ -S $SOCKET ]] || { cat "$DEMO_DIR/agent.log"; echo "agent did not start" >&2; exit 1; }
AGENT=("$BIN" --socket "$SOCKET")
sleep 0.3

step "instance-agent status"
"${AGENT[@]}" status || true

for demo in scripts/demo.d/*.sh; do
  [[ -e $demo ]] || continue
  # shellcheck source=/dev/null
  source "$demo"
done

step "stop the agent (SIGTERM)"
kill -TERM "$AGENT_PID"
wait "$AGENT_PID"
echo "agent stopped cleanly (exit $?)"
AGENT_PID=
tail -n 3 "$DEMO_DIR/agent.log"
