#!/usr/bin/env bash
# tests/bench.sh [SECONDS [PART...]]: side-by-side benchmarks on this machine, in one run: Postern's
# daemons (release build) and the Debian peers they replace, driven by the same load generators
# (tests/src/bin/) on loopback. Prints one line per run; the figures go to tests/BENCHMARKS.md.
# Each part is a file tests/bench/PART.sh; with no PART given, every part runs in name order.
# Run as root (the peers drop privileges to their own users).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
shift || true
PARTS=("$@")
if [ ${#PARTS[@]} -eq 0 ]; then for f in tests/bench/*.sh; do PARTS+=("$(basename "$f" .sh)"); done; fi
bash tests/setup.sh
cargo build --release --locked --ignore-rust-version --bins -p postern-policyd -p postern-milter -p postern-srsd -p postern-tests
B=$PWD/target/release
W=$(mktemp -d /tmp/postern-bench.XXXXXX); chmod 755 "$W"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on port $1" >&2; return 1; }
row() { printf "%-44s %s\n" "$1" "$2"; }

echo "# $(date -u +%F) on $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; ${SECS}s per run"

for part in "${PARTS[@]}"; do
    # shellcheck source=/dev/null
    source "tests/bench/$part.sh"
done
