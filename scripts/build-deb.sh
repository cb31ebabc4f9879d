#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (metadata: [package.metadata.deb]
# in Cargo.toml; maintainer scripts, sysusers.d and tmpfiles.d entries in
# packaging/). Installs cargo-deb first when it is missing.
#
#   scripts/build-deb.sh                     release build, then the .deb in target/debian/
#   scripts/build-deb.sh --no-build          package the release binary already built
#   scripts/build-deb.sh --binary PATH --output DIR [--fast]
#                                            package PATH (e.g. the debug binary the tests
#                                            built) instead; it is staged in a private target
#                                            dir, so target/release is neither needed nor touched
#   scripts/build-deb.sh --install-tool      only make sure cargo-deb is installed
#
# The default config (/etc/instance-agent/config.toml, a conffile) is written
# by the packaged binary itself (`instance-agent config default`), so it always
# matches the code. Prints the path of the .deb on the last line.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
if [[ -d $HOME/.cargo/bin && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi

build=1
binary=""
output=""
fast=()
strip=()
install_only=0
while (($#)); do
  case $1 in
    --no-build) build=0 ;;
    --binary) binary=$2; build=0; shift ;;
    --output | -o) output=$2; shift ;;
    --fast) fast=(--fast) ;;
    --install-tool) install_only=1 ;;
    *) echo "build-deb.sh: unknown argument $1" >&2; exit 64 ;;
  esac
  shift
done

if ! cargo deb --version >/dev/null 2>&1; then
  echo "[build-deb] installing cargo-deb (cargo install cargo-deb --locked)" >&2
  cargo install cargo-deb --locked --quiet
fi
((install_only)) && exit 0

stage=""
# An EXIT trap must not fail: under `set -e` a failing command in it ends the
# script with that command's status, whatever the script's own was (a
# trailing `[[ -n $stage ]] && ...` made every successful run exit 1).
cleanup() {
  if [[ -n $stage ]]; then rm -rf "$stage" || true; fi
}
trap cleanup EXIT

if [[ -n $binary ]]; then
  # cargo-deb takes `target/release/...` assets from Cargo's target dir:
  # point CARGO_TARGET_DIR at a private one holding a copy of the binary
  # (a copy, not a link: cargo-deb strips what it packages).
  stage=$(mktemp -d "${TMPDIR:-/tmp}/instance-agent-deb.XXXXXX")
  mkdir -p "$stage/release"
  cp "$binary" "$stage/release/instance-agent"
  export CARGO_TARGET_DIR=$stage
  release_dir=$stage/release
  # A debug build carries its debug info; the release profile strips already.
  strip=(--strip)
else
  release_dir=${CARGO_TARGET_DIR:-$repo_root/target}/release
  if ((build)); then
    echo "[build-deb] cargo build --release --locked" >&2
    cargo build --release --locked --quiet
  fi
  [[ -x $release_dir/instance-agent ]] || {
    echo "build-deb.sh: $release_dir/instance-agent is missing: run without --no-build" >&2
    exit 1
  }
fi

# Written atomically: a concurrent run may be packaging the same file.
"$release_dir/instance-agent" config default >"$release_dir/instance-agent.default.toml.$$"
mv -f "$release_dir/instance-agent.default.toml.$$" "$release_dir/instance-agent.default.toml"

args=(--no-build --locked "${fast[@]}" "${strip[@]}")
if [[ -n $output ]]; then
  mkdir -p "$output"
  args+=(--output "$output")
fi
cargo deb "${args[@]}"
