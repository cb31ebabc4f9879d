# Images: a local registry with TLS (a CA made here, trusted by the engine
# through /etc/docker/certs.d) and a password, an image pushed to it, the
# agent logged in, and a job whose image the agent pulls, its progress shown
# before its output. Everything the step makes (the registry, its CA in
# certs.d, the local images of its repository) is removed at its end, also
# when the demo fails.
step "images: a local registry (TLS from a demo CA, a password) with an image pushed to it"
REG_DIR="$DEMO_DIR/registry"
mkdir -p "$REG_DIR"
REG_PORT=15443
while (exec 3<>"/dev/tcp/127.0.0.1/$REG_PORT") 2>/dev/null; do
  REG_PORT=$((REG_PORT + 1))
done
REG_HOST="127.0.0.1:$REG_PORT"
REG_PID=
images_cleanup() {
  if [[ -n $REG_PID ]]; then
    kill "$REG_PID" 2>/dev/null || true
    wait "$REG_PID" 2>/dev/null || true
    REG_PID=
  fi
  rm -rf "/etc/docker/certs.d/$REG_HOST"
  # Only the images of this registry's repositories (its port is in their names).
  docker images --no-trunc --format '{{.ID}} {{.Repository}}' |
    awk -v prefix="$REG_HOST/" 'index($2, prefix) == 1 {print $1}' | sort -u |
    xargs -r docker rmi -f >/dev/null 2>&1 || true
}
trap 'images_cleanup; cleanup' EXIT

(
  cd "$REG_DIR"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 1 \
    -subj "/CN=instance-agent demo registry CA" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj "/CN=127.0.0.1" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\n' >san.cnf
  openssl x509 -req -in srv.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out srv.crt -days 1 \
    -extfile san.cnf 2>/dev/null
)
# The password never goes on a command line (printf is a shell builtin).
REG_PASSWORD=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
printf '%s' "$REG_PASSWORD" | htpasswd -niB demo >"$REG_DIR/htpasswd"
cat >"$REG_DIR/config.yml" <<YAML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $REG_DIR/storage
http:
  addr: $REG_HOST
  secret: $(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
  tls:
    certificate: $REG_DIR/srv.crt
    key: $REG_DIR/srv.key
auth:
  htpasswd:
    realm: demo
    path: $REG_DIR/htpasswd
YAML
docker-registry serve "$REG_DIR/config.yml" >"$REG_DIR/registry.log" 2>&1 &
REG_PID=$!
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$REG_PORT") 2>/dev/null && break
  sleep 0.1
done
mkdir -p "/etc/docker/certs.d/$REG_HOST"
cp "$REG_DIR/ca.crt" "/etc/docker/certs.d/$REG_HOST/ca.crt"
echo "registry at https://$REG_HOST (pid $REG_PID), user demo, CA in /etc/docker/certs.d/$REG_HOST/"

# An image: the busybox test image and two layers of 24 MiB of random data,
# pushed with a docker config of the demo's own (never root's).
mkdir -p "$REG_DIR/image"
for layer in 1 2; do
  head -c $((24 << 20)) /dev/urandom >"$REG_DIR/image/layer$layer.bin"
done
printf 'FROM instance-agent/busybox:test\nCOPY layer1.bin /data/\nCOPY layer2.bin /data/\n' >"$REG_DIR/image/Dockerfile"
DEMO_IMAGE="$REG_HOST/demo/env:1"
export DOCKER_CONFIG="$REG_DIR/docker"
# (Their notes on stderr, about plain-text credentials and the legacy
# builder, are noise here: the config and the image are the demo's own.)
printf '%s' "$REG_PASSWORD" | docker login -u demo --password-stdin "$REG_HOST" >/dev/null 2>&1
DOCKER_BUILDKIT=0 docker build -q -t "$DEMO_IMAGE" "$REG_DIR/image" >/dev/null 2>&1
docker push -q "$DEMO_IMAGE" >/dev/null
docker rmi "$DEMO_IMAGE" >/dev/null
unset DOCKER_CONFIG
echo "pushed $DEMO_IMAGE (48 MiB of random layers); not on the instance any more"

step "images: without a credential the job fails, and says why"
"${AGENT[@]}" jobs submit --id demo-no-login --image "$DEMO_IMAGE" --wait -- true || true
"${AGENT[@]}" jobs get demo-no-login | grep -E '^state'

step "images: log in, then a job from the registry (its image's pull, then its output)"
printf '%s' "$REG_PASSWORD" | "${AGENT[@]}" images login "$REG_HOST" -u demo --password-stdin
"${AGENT[@]}" images logins
"${AGENT[@]}" jobs submit --id demo-image --image "$DEMO_IMAGE" --wait -- \
  sh -c 'echo "hello from the pulled image"; ls -l /data'
"${AGENT[@]}" jobs get demo-image | grep -E '^(state|image|digest)'
"${AGENT[@]}" images list
"${AGENT[@]}" images logout "$REG_HOST"

images_cleanup
trap cleanup EXIT
