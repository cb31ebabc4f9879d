# Disk guard demo (sourced by scripts/demo.sh): a 64 MiB tmpfs filled across
# its levels (warning 16 MiB, floor 8 MiB) and emptied again, with the alerts
# as a client sees them, then the operator's tools.
disk_demo="$DEMO_DIR/disk-demo"
mkdir -p "$disk_demo"
mount -t tmpfs -o size=64m instance-agent-demo "$disk_demo"
# The watched path lives inside the tmpfs, so it appears only once mounted.
mkdir "$disk_demo/data"
sleep 1.5

step "instance-agent disk (every watched filesystem, like df -h)"
"${AGENT[@]}" disk || true

step "fill $disk_demo across its levels and back; alerts as they arrive"
"${AGENT[@]}" disk --watch >"$DEMO_DIR/disk-alerts.txt" &
disk_watch=$!
sleep 0.5
fallocate -l 50M "$disk_demo/data/fill" # about 14 MiB free: warning
sleep 1.5
fallocate -l 58M "$disk_demo/data/fill" # about 6 MiB free: critical
sleep 1.5
"${AGENT[@]}" status | grep -E 'disk|held' || true
rm "$disk_demo/data/fill" # all free: ok after 3 s held
sleep 5
kill "$disk_watch" 2>/dev/null || true
wait "$disk_watch" 2>/dev/null || true
cat "$DEMO_DIR/disk-alerts.txt"

step "instance-agent disk --top $repo_root/src (what to delete)"
"${AGENT[@]}" disk --top "$repo_root/src" --limit 5 || true

step "instance-agent disk --reclaim --dry-run --all-steps"
"${AGENT[@]}" disk --reclaim --dry-run --all-steps || true

umount "$disk_demo" || umount -l "$disk_demo" || true
