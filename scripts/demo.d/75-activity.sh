# Activity: the instance turns active while a job runs, says which, and idle
# once it is over, with the job as the last activity.
step "activity: busy with a job, then idle"
"${AGENT[@]}" jobs submit --id demo-activity --image instance-agent/busybox:test -- sleep 4 >/dev/null
for _ in $(seq 1 40); do
  "${AGENT[@]}" activity | grep -q 'job demo-activity' && break
  sleep 0.25
done
"${AGENT[@]}" activity
echo "... waiting for the job to end"
for _ in $(seq 1 80); do
  "${AGENT[@]}" activity | grep -q '^idle since' && break
  sleep 0.25
done
"${AGENT[@]}" activity
