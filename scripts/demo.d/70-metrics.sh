# metrics: Prometheus text on loopback; a few of the series.
step "metrics: http://127.0.0.1:$METRICS_PORT/metrics (a few series)"
exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT"
printf 'GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
metrics=$(cat <&3)
exec 3<&-
grep -E '^instance_agent_(jobs_by_state|slots_(in_use|capacity)|disk_free_bytes|mount_state|setup_runs_total|rpcs_total|process_resident_memory_bytes)' <<<"$metrics" | head -n 16 || true
echo "($(grep -c '^instance_agent_' <<<"$metrics") samples in all)"
