# Security: who may use the socket, a user outside the operator group turned
# away, and the audit lines the previous steps left (one per mutating RPC).
step "security: socket ownership, a non-operator refused, the audit log"
ls -l "$SOCKET"
chmod 711 "$DEMO_DIR"
if id nobody >/dev/null 2>&1 && command -v setpriv >/dev/null; then
  echo "\$ instance-agent status   # as nobody (not in the operator group)"
  setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups -- \
    "${AGENT[@]}" status 2>&1 || true
fi
echo "audit lines so far: $(grep -c 'audit: /' "$DEMO_DIR/agent.log" || true); the last two:"
grep 'audit: /' "$DEMO_DIR/agent.log" | tail -n 2 | sed "s/^.*\\(audit: \/.* -> [A-Za-z]*\\).*$/  \\1/"
