#!/usr/bin/env bash
# fuzz/run.sh [SECONDS]: a bounded smoke run of every fuzz target (default 20 s each) with
# cargo-fuzz on the nightly toolchain. tests/run.sh calls it when a nightly toolchain exists.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-20}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for target in $(cargo +nightly fuzz list); do
    echo "fuzz: $target for ${seconds}s"
    cargo +nightly fuzz run "$target" -- -max_total_time="$seconds" -rss_limit_mb=2048 2>&1 | tail -n 2
done
