# File share mounts: mount a container, break it (SIGKILL the blobfuse2
# process, as an OOM kill would), watch the agent detect the stale mount and
# repair it, then unmount. blobfuse2 itself needs Azure storage, so the demo
# uses the stand-in built from this crate (a real FUSE mount of a local dir).
# shellcheck shell=bash

step "file share mounts: build the blobfuse2 stand-in"
cargo build --release --quiet --features test-util --bin blobfuse2-standin
mkdir -p "$DEMO_DIR/bin" "$DEMO_DIR/mnt" "$DEMO_DIR/storage/data"
# A wrapper in blobfuse2's place that tells the stand-in where its "storage"
# is; `exec` keeps the pid and puts blobfuse2's arguments on the command line.
cat >"$DEMO_DIR/bin/blobfuse2" <<WRAPPER
#!/bin/sh
STANDIN_STORAGE_ROOT="$DEMO_DIR/storage" exec "$repo_root/target/release/blobfuse2-standin" "\$@"
WRAPPER
chmod +x "$DEMO_DIR/bin/blobfuse2"
echo "hello from blob storage" >"$DEMO_DIR/storage/data/hello.txt"
( umask 077; printf 'ZGVtby1hY2NvdW50LWtleQ==' >"$DEMO_DIR/data.key" )
MOUNT="$DEMO_DIR/mnt/data"

# Never leave a FUSE mount behind if the demo stops half-way.
mounts_demo_cleanup() {
  if grep -q " $MOUNT " /proc/self/mountinfo 2>/dev/null; then
    fusermount3 -u -z "$MOUNT" 2>/dev/null || true
  fi
  local pid
  for pid in $(pgrep -f -x ".*blobfuse2-standin mount $MOUNT .*" || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap 'mounts_demo_cleanup; cleanup' EXIT

json_field() { grep -o "\"$1\": *[^,}]*" | head -n 1 | sed 's/.*: *//; s/"//g'; }

step "instance-agent mounts mount data (the key is read from a 0600 file, never an argument)"
started=$(date +%s%N)
"${AGENT[@]}" mounts mount data --account demoacct --container data \
  --path "$MOUNT" --account-key-file "$DEMO_DIR/data.key"
echo "mounted in $(( ($(date +%s%N) - started) / 1000000 )) ms"
"${AGENT[@]}" mounts list || true
grep " $MOUNT " /proc/self/mountinfo
echo "\$ cat $MOUNT/hello.txt"; cat "$MOUNT/hello.txt"
echo "written through the mount" >"$MOUNT/from-the-vm.txt"
echo "\$ ls storage/data"; ls "$DEMO_DIR/storage/data"
echo "\$ ls -l run/mounts (the rendered config, mode 0600)"; ls -l "$DEMO_DIR/run/mounts"

step "SIGKILL blobfuse2 (as an OOM kill would): the mount goes stale"
pid=$("${AGENT[@]}" --json mounts list | json_field pid)
kill -KILL "$pid"
sleep 0.2
ls "$MOUNT" 2>&1 | head -n 1 || true
killed=$(date +%s%N)
for _ in $(seq 1 300); do
  json=$("${AGENT[@]}" --json mounts list || true)
  [[ $(json_field state <<<"$json") == MOUNT_STATE_MOUNTED && $(json_field remountCount <<<"$json") == 1 ]] && break
  sleep 0.1
done
echo "detected and repaired in $(( ($(date +%s%N) - killed) / 1000000 )) ms (health interval 2 s)"
"${AGENT[@]}" mounts list || true
echo "\$ cat $MOUNT/hello.txt"; cat "$MOUNT/hello.txt"

step "instance-agent mounts unmount data"
"${AGENT[@]}" mounts unmount data
if grep -q " $MOUNT " /proc/self/mountinfo; then
  echo "still mounted!"
else
  echo "no longer in mountinfo; $MOUNT is empty: [$(ls -A "$MOUNT")]"
fi
