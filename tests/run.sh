#!/usr/bin/env bash
# Runs every check Postern has, on a fresh Debian 12 machine with the Rust toolchain:
# installs what is missing (tests/setup.sh), then formatting, clippy with warnings as errors,
# and every test: unit, daemon-level, Redis/SQL, peers interop and end to end through a real
# Postfix. With CI set, a test whose server (Postfix, Redis, ...) cannot start fails.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
step() { printf '\n=== %s (+%ss)\n' "$*" $(( $(date +%s) - started )); }

# mail-auth 0.15 depends on mail-parser 1.0, which declares rust-version 1.98; it builds and
# works on this toolchain, so every cargo call that builds passes --ignore-rust-version.
CARGO_FLAGS=(--ignore-rust-version --locked)
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2}
export CARGO_TERM_COLOR=never

step "installing what the tests need"
bash tests/setup.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets "${CARGO_FLAGS[@]}" -- -D warnings

step "building the daemons and test binaries"
cargo build --workspace --bins --tests "${CARGO_FLAGS[@]}"

step "running every test"
if command -v cargo-nextest >/dev/null 2>&1; then
    # --no-fail-fast: one red test must not hide the others' results.
    cargo nextest run --workspace "${CARGO_FLAGS[@]}" --no-fail-fast --config-file tests/nextest.toml --profile ci
else
    cargo test --workspace "${CARGO_FLAGS[@]}" --no-fail-fast
fi

step "done in $(( $(date +%s) - started )) s"
