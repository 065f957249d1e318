#!/usr/bin/env bash
# Builds the Debian packages postern-policyd, postern-milter and postern-srsd into target/debian/
# (cargo-deb, installed from crates.io when missing). Then: apt install ./target/debian/*.deb
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked
cargo build --release --locked --ignore-rust-version -p postern-policyd -p postern-milter -p postern-srsd
for daemon in policyd milter srsd; do
    cargo deb --no-build -p "postern-$daemon"
done
ls -l target/debian/*.deb
