# doctor: every check with its fix, then a support bundle (no secrets in it).
step "doctor: checks and a support bundle"
status=0
"${AGENT[@]}" doctor --config "$DEMO_DIR/config.toml" --log-file "$DEMO_DIR/agent.log" \
  --bundle "$DEMO_DIR/support.tgz" || status=$?
echo "doctor exit status $status (0 all pass, 1 warnings, 2 failures)"
tar tzf "$DEMO_DIR/support.tgz"
