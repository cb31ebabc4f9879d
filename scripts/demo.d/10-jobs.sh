# Jobs: three times the capacity of short jobs; the slots fill, the rest
# queue, then everything succeeds.
step "jobs: submit 3 x capacity short jobs"
capacity=$("${AGENT[@]}" status --json | sed -n 's/.*"capacity": \([0-9]*\).*/\1/p' | head -1)
total=$((capacity * 3))
for i in $(seq 1 "$total"); do
  "${AGENT[@]}" jobs submit --id "demo-$i" --image instance-agent/busybox:test -- \
    sh -c "echo job $i on \$(hostname); sleep 2" >/dev/null
done
sleep 1
"${AGENT[@]}" status | grep -E 'slots'
"${AGENT[@]}" jobs list --limit "$total" | head -n $((total + 1))
echo "... waiting for all $total jobs"
for _ in $(seq 1 120); do
  left=$("${AGENT[@]}" jobs list --state queued --state starting --state running --json | grep -c '"id"' || true)
  [[ $left -eq 0 ]] && break
  sleep 0.5
done
"${AGENT[@]}" jobs list --limit "$total" | awk 'NR>1 {print $2}' | sort | uniq -c
echo "logs of demo-1:"
"${AGENT[@]}" jobs logs demo-1
