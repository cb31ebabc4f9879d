#!/usr/bin/env bash
# Full test entry point: prepare the host (packages, Docker engine, test image,
# FUSE, Rust components, mmdebstrap and systemd-nspawn), then run rustfmt
# check, clippy (warnings are errors) and the test suite (the agent under a
# booted systemd included), then a Python client generated from proto/ alone,
# then the fault-injection suite in its short mode (scripts/chaos.sh), and
# last the sweep of every captured agent log for the secrets the tests used
# (scripts/check-test-logs.sh).
# Extra arguments are passed through to `cargo test`.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"

scripts/prepare-host.sh

# Every agent the tests start keeps its log and logs dir here, and every
# test secret is listed here (tests/common); emptied so the sweep at the end
# sees this run only.
export INSTANCE_AGENT_TEST_LOGS="$repo_root/target/test-logs"
rm -rf "$INSTANCE_AGENT_TEST_LOGS"
mkdir -p "$INSTANCE_AGENT_TEST_LOGS"

if [[ -d $HOME/.cargo/bin && ":$PATH:" != *":$HOME/.cargo/bin:"* ]]; then
  PATH="$HOME/.cargo/bin:$PATH"
fi

echo "[test] cargo fmt --all -- --check"
cargo fmt --all -- --check

echo "[test] cargo clippy --all-targets --all-features -- -D warnings"
cargo clippy --all-targets --all-features -- -D warnings

# tests/deb_package.rs and tests/scripts.rs build and install the .deb (into
# a scratch root and into an image build's chroot), tests/systemd_boot.rs
# installs it in a Debian 12 container booted under systemd-nspawn, and
# tests/systemd_unit.rs runs systemd-analyze verify on the unit; here they
# must not skip. The package holds the debug binary the tests built
# (stripped), not a release build. The rootfs they share is made once
# with mmdebstrap (about 20 s) and cached under target/tmp/systemd-harness/.
scripts/build-deb.sh --install-tool
export INSTANCE_AGENT_REQUIRE_DEB_TEST=1
export INSTANCE_AGENT_REQUIRE_SYSTEMD_TEST=1

# --no-fail-fast: one failing test binary does not hide the others'.
echo "[test] cargo test --all-features --no-fail-fast $*"
cargo test --all-features --no-fail-fast "$@"

echo "[test] scripts/python-client-check.sh (a client generated from proto/ alone)"
scripts/python-client-check.sh

echo "[test] scripts/chaos.sh short (fault injection; stops and freezes the Docker engine)"
scripts/chaos.sh short

echo "[test] scripts/check-test-logs.sh (no test secret in any captured agent log)"
scripts/check-test-logs.sh "$INSTANCE_AGENT_TEST_LOGS"
