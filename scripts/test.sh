#!/usr/bin/env bash
# Full test entry point: prepare the host (packages, Docker engine, test image,
# FUSE, Rust components), then run rustfmt check, clippy (warnings are errors)
# and the test suite, then a Python client generated from proto/ alone, then
# the fault-injection suite in its short mode (scripts/chaos.sh).
# Extra arguments are passed through to `cargo test`.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

scripts/prepare-host.sh

if [[ -d $HOME/.cargo/bin && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi

echo "[test] cargo fmt --all -- --check"
cargo fmt --all -- --check

echo "[test] cargo clippy --all-targets --all-features -- -D warnings"
cargo clippy --all-targets --all-features -- -D warnings

# tests/deb_package.rs builds and installs the .deb; here it must not skip.
scripts/build-deb.sh --install-tool
export INSTANCE_AGENT_REQUIRE_DEB_TEST=1

echo "[test] cargo test --all-features $*"
cargo test --all-features "$@"

echo "[test] scripts/python-client-check.sh (a client generated from proto/ alone)"
scripts/python-client-check.sh

echo "[test] scripts/chaos.sh short (fault injection; stops and freezes the Docker engine)"
scripts/chaos.sh short
