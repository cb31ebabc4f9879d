# metrics: Prometheus text on loopback; a few of the series.
step "metrics: http://127.0.0.1:$METRICS_PORT/metrics (a few series)"
exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT"
printf 'GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
metrics=$(cat <&3)
exec 3<&-
grep -E '^instance_agent_(jobs_finished_total|job_slots_(in_use|capacity)|job_queue_depth|disk_free_bytes|disk_reclaims_total|mount_state\{.*\} 1|mount_remounts_total|setup_runs_total|resident_memory_bytes|cpu_seconds_total)' <<<"$metrics" | head -n 20 || true
echo "($(grep -c '^instance_agent_' <<<"$metrics") samples in all)"
