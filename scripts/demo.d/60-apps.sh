# Apps: a local inference endpoint (the Azure ML preset) of the test image:
# busybox httpd on container port 5001, the model directory bind-mounted
# read-only, READY only once its health check answers, then scored through
# `apps invoke` and removed. The container and the demo's network are
# removed at the end even when a command fails.
step "apps: deploy a local inference endpoint and score it"
demo_apps_cleanup() {
  local ids
  ids=$(docker ps -aq --filter label=io.instance-agent.app=demo-model 2>/dev/null || true)
  [[ -n $ids ]] && docker rm -f $ids >/dev/null 2>&1
  docker network rm instance-agent-demo-apps >/dev/null 2>&1 || true
}
trap 'demo_apps_cleanup; cleanup' EXIT
mkdir -p "$DEMO_DIR/models/m1"
echo "weights=42" >"$DEMO_DIR/models/m1/weights.txt"
# The server: GET / for liveness; POST /score (httpd redirects it to /score/,
# which `apps invoke` follows) runs a CGI that reads the model and echoes.
server='mkdir -p /www/cgi-bin /www/score && echo alive >/www/index.html
cat >/www/cgi-bin/index.cgi <<"CGI"
#!/bin/sh
printf "Content-Type: application/json\r\n\r\n"
printf "{\"entry\":\"%s\",\"model\":\"%s\",\"input\":%s}\n" "$AZUREML_ENTRY_SCRIPT" "$(cat "$AZUREML_MODEL_DIR/weights.txt")" "$(cat)"
CGI
chmod +x /www/cgi-bin/index.cgi
exec httpd -f -p 5001 -h /www'
"${AGENT[@]}" apps deploy demo-model --image instance-agent/busybox:test \
  --inference-model "$DEMO_DIR/models/m1" --entry-script score.py --interval 1 --wait \
  -- sh -c "$server"
"${AGENT[@]}" apps list
echo '{"data": [1, 2, 3]}' >"$DEMO_DIR/request.json"
"${AGENT[@]}" apps invoke demo-model --data "@$DEMO_DIR/request.json"
"${AGENT[@]}" apps rm demo-model >/dev/null
echo "removed: $("${AGENT[@]}" apps list | tail -n +2 | wc -l) apps left"
