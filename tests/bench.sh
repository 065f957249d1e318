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
# with_cpu GENERATOR ARGS...: the generator's line, plus the CPU the rest of the machine (the
# server under test) spent per request: all busy CPU during the run minus the generator's own.
busy_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
with_cpu() {
    local before after line
    before=$(busy_ticks)
    line=$(/usr/bin/time -f "%U %S" -o "$W/generator.time" "$@")
    after=$(busy_ticks)
    python3 - "$before" "$after" "$(cat "$W/generator.time")" "$line" "$(getconf CLK_TCK)" <<'PY'
import sys
before, after, gen, line, hz = sys.argv[1:]
user, sys_ = (float(x) for x in gen.split())
requests = int(line.split()[0])
server = (int(after) - int(before)) / int(hz) - user - sys_
print(f"{line}, server CPU {server / max(requests, 1) * 1e6:.1f} us/req")
PY
}

echo "# $(date -u +%F) on $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; ${SECS}s per run"

for part in "${PARTS[@]}"; do
    # shellcheck source=/dev/null
    source "tests/bench/$part.sh"
done
