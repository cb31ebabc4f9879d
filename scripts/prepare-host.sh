#!/usr/bin/env bash
# Prepare this (Debian 12) host for the instance-agent test suite.
#
# Idempotent and cheap when everything is already in place. It makes sure of:
#   * Debian packages: docker.io fuse3 busybox-static e2fsprogs util-linux procps
#     systemd openssl (TLS 1.1 client for the security tests) passwd (useradd)
#     python3 python3-venv (scripts/python-client-check.sh: a venv, then grpcio from PyPI)
#     mmdebstrap systemd-container (tests/systemd_boot.rs and tests/deb_package.rs: a Debian 12
#     rootfs made once and cached under target/, booted with systemd-nspawn)
#   * a running Docker engine (started by hand: there is no systemd here)
#   * the local image instance-agent/busybox:test (built from busybox-static,
#     no registry access needed)
#   * /dev/fuse and `user_allow_other` in /etc/fuse.conf
#   * cargo fmt / cargo clippy
# It prints one short line per step. Must run as root.
set -euo pipefail

readonly PACKAGES=(docker.io fuse3 busybox-static e2fsprogs util-linux procps systemd openssl passwd python3 python3-venv
  mmdebstrap systemd-container)
readonly TEST_IMAGE="instance-agent/busybox:test"
readonly DOCKERD_LOG="/var/log/instance-agent-test-dockerd.log"
readonly DOCKERD_WAIT_SECS=60
# Applets the tests rely on; every busybox applet gets a link, these must exist.
readonly REQUIRED_APPLETS=(sh true false sleep echo cat ls mkdir touch rm dd head
  tail env id wc yes seq kill)

say() { printf '[prepare-host] %s\n' "$*"; }
die() { printf '[prepare-host] ERROR: %s\n' "$*" >&2; exit 1; }

if [[ $(id -u) -ne 0 ]]; then
  die "must run as root"
fi

# --- Debian packages ---------------------------------------------------------
pkg_installed() {
  [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
  pkg_installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]} == 0)); then
  say "packages: all present (${PACKAGES[*]})"
else
  say "packages: installing ${missing[*]}"
  # Keep package maintainer scripts from starting services (e.g. dockerd with
  # default bridge/iptables settings); we start the engine ourselves below.
  policy_rc_d=/usr/sbin/policy-rc.d
  created_policy=0
  if [[ ! -e $policy_rc_d ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy_rc_d"
    chmod +x "$policy_rc_d"
    created_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
  if ((created_policy)); then rm -f "$policy_rc_d"; fi
  for pkg in "${missing[@]}"; do
    pkg_installed "$pkg" || die "package $pkg still not installed"
  done
  say "packages: installed ${missing[*]}"
fi

# --- Docker engine -----------------------------------------------------------
# /usr/local/bin/docker (a newer client) shadows Debian's /usr/bin/docker; the
# client negotiates the API version down to what the engine speaks, so either
# works. Fail clearly if that ever stops being true.
if docker info >/dev/null 2>&1; then
  say "docker: engine already running"
else
  say "docker: engine not reachable, starting dockerd (log: $DOCKERD_LOG)"
  command -v dockerd >/dev/null || die "dockerd not found (is docker.io installed?)"
  mkdir -p "$(dirname "$DOCKERD_LOG")"
  printf '\n=== %s: started by %s ===\n' "$(date -Is)" "$0" >>"$DOCKERD_LOG"
  setsid nohup dockerd --bridge=none --iptables=false \
    >>"$DOCKERD_LOG" 2>&1 </dev/null &
  dockerd_pid=$!
  deadline=$((SECONDS + DOCKERD_WAIT_SECS))
  until docker info >/dev/null 2>&1; do
    if ! kill -0 "$dockerd_pid" 2>/dev/null; then
      tail -n 30 "$DOCKERD_LOG" >&2 || true
      die "dockerd exited early; see $DOCKERD_LOG (tail above)"
    fi
    if ((SECONDS >= deadline)); then
      tail -n 30 "$DOCKERD_LOG" >&2 || true
      die "docker info still failing after ${DOCKERD_WAIT_SECS}s; see $DOCKERD_LOG (tail above)"
    fi
    sleep 0.5
  done
  say "docker: dockerd started (pid $dockerd_pid)"
fi
if ! docker version >/dev/null 2>&1; then
  docker version >&2 || true
  die "'$(command -v docker)' cannot talk to the engine (API version mismatch?)"
fi
say "docker: $(docker version --format 'client {{.Client.Version}} (API {{.Client.APIVersion}}, negotiated), engine {{.Server.Version}} (API {{.Server.APIVersion}})')"

# --- Test image --------------------------------------------------------------
build_test_image() {
  local busybox=/bin/busybox rootfs applet
  [[ -x $busybox ]] || die "$busybox missing (busybox-static not installed?)"
  build_tmp=$(mktemp -d)
  trap 'rm -rf "$build_tmp"' EXIT
  rootfs=$build_tmp/rootfs
  mkdir -p "$rootfs"/{bin,etc,root,tmp,proc,sys,dev}
  chmod 1777 "$rootfs/tmp"
  chmod 0700 "$rootfs/root"
  cp "$busybox" "$rootfs/bin/busybox"
  for applet in $("$busybox" --list); do
    [[ $applet == busybox ]] && continue
    ln -s busybox "$rootfs/bin/$applet"
  done
  for applet in "${REQUIRED_APPLETS[@]}"; do
    [[ -L $rootfs/bin/$applet ]] || die "busybox lacks required applet '$applet'"
  done
  cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
  cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
  tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf "$build_tmp/rootfs.tar" .
  docker import --change 'CMD ["/bin/sh"]' "$build_tmp/rootfs.tar" "$TEST_IMAGE" >/dev/null
}

if docker image inspect "$TEST_IMAGE" >/dev/null 2>&1; then
  say "image: $TEST_IMAGE present"
else
  say "image: building $TEST_IMAGE from $(dpkg-query -W -f='busybox-static ${Version}' busybox-static)"
  build_test_image
  if ! docker run --rm --network none "$TEST_IMAGE" true; then
    docker image rm "$TEST_IMAGE" >/dev/null 2>&1 || true
    die "built $TEST_IMAGE but 'docker run ... true' failed"
  fi
  say "image: built $TEST_IMAGE ($(docker image inspect --format '{{.Id}}' "$TEST_IMAGE" | cut -c1-19)), smoke run ok"
fi

# --- FUSE --------------------------------------------------------------------
if [[ -c /dev/fuse ]]; then
  say "fuse: /dev/fuse present"
else
  modprobe fuse 2>/dev/null || true
  if [[ ! -e /dev/fuse ]] && grep -qw fuse /proc/filesystems; then
    mknod -m 0666 /dev/fuse c 10 229 || true
  fi
  [[ -c /dev/fuse ]] || die "/dev/fuse missing and could not be created (no fuse in kernel?)"
  say "fuse: created /dev/fuse"
fi
# The kernel makes /dev/fuse 0666 (users mount through it, fusermount3 only
# checks the mount point); a container's static /dev may have it 0600, and
# then no user's FUSE daemon (a mount's blobfuse2 runs as its owner) can mount.
if [[ "$(stat -c %a /dev/fuse)" != 666 ]]; then
  chmod 0666 /dev/fuse
  say "fuse: /dev/fuse made 0666, as the kernel has it"
fi

fuse_conf=/etc/fuse.conf
if grep -qE '^[[:space:]]*user_allow_other[[:space:]]*$' "$fuse_conf" 2>/dev/null; then
  say "fuse: user_allow_other already set in $fuse_conf"
elif grep -qE '^[[:space:]]*#[[:space:]]*user_allow_other[[:space:]]*$' "$fuse_conf" 2>/dev/null; then
  sed -i -E 's/^[[:space:]]*#[[:space:]]*user_allow_other[[:space:]]*$/user_allow_other/' "$fuse_conf"
  say "fuse: uncommented user_allow_other in $fuse_conf"
else
  echo user_allow_other >>"$fuse_conf"
  say "fuse: added user_allow_other to $fuse_conf"
fi

# --- Rust toolchain ----------------------------------------------------------
if [[ -d $HOME/.cargo/bin && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || die "cargo not found; install Rust via rustup first"
if cargo fmt --version >/dev/null 2>&1 && cargo clippy --version >/dev/null 2>&1; then
  say "rust: $(cargo --version | cut -d' ' -f1-2), rustfmt and clippy present"
else
  command -v rustup >/dev/null || die "cargo fmt/clippy missing and rustup not found"
  say "rust: adding rustfmt and clippy via rustup"
  rustup component add rustfmt clippy
  if ! { cargo fmt --version >/dev/null && cargo clippy --version >/dev/null; }; then
    die "cargo fmt/clippy still unavailable after rustup component add"
  fi
  say "rust: rustfmt and clippy installed"
fi

say "host ready"
