# Setup scripts (sourced by scripts/demo.sh): a creation script run through
# the agent with its live log, a script killed at its timeout with the
# background processes it tried to leave behind, and the runs as recorded.

step "setup: run a creation script and follow its log"
"${AGENT[@]}" setup run --kind creation --follow -c '
echo "provisioning $CI_NAME as $(id -un), cwd $(pwd)"
for tool in python3 git docker; do
  echo "  $tool: $(command -v "$tool" || echo missing)"
done
echo "this line goes to stderr" >&2
echo "done"
' || true

step "setup: a script over its 2 s timeout, leaving nohup and setsid children"
"${AGENT[@]}" setup run --timeout 2s --follow -c '
nohup sleep 600 >/dev/null 2>&1 &
setsid sleep 601 &
echo "started background children; now hanging"
sleep 602
' || true
echo "processes left from it: $(pgrep -fc 'sleep 60[012]' || true)"

step "setup: runs (instance-agent setup list), and the setup condition"
"${AGENT[@]}" setup list
"${AGENT[@]}" status | grep -E '^  (setup|slots)' || true
last=$("${AGENT[@]}" --json setup list --kind creation | sed -n 's/.*"logPath": "\(.*\)".*/\1/p' | head -n 1)
echo "the creation script's log file ($last):"
head -n 4 "$last"
