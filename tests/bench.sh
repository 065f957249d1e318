#!/usr/bin/env bash
# tests/bench.sh [SECONDS]: side-by-side benchmarks on this machine, in one run: Postern's
# daemons (release build) and the Debian peers they replace, driven by the same load generators
# (tests/src/bin/) on loopback. Prints one line per run; the figures go to tests/BENCHMARKS.md.
# Run as root (the peers drop privileges to their own users).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
bash tests/setup.sh
cargo build --release --locked --ignore-rust-version --bins -p postern-policyd -p postern-milter -p postern-srsd -p postern-tests
B=$PWD/target/release
W=$(mktemp -d /tmp/postern-bench.XXXXXX); chmod 755 "$W"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "nothing on port $1" >&2; return 1; }
row() { printf '%-44s %s\n' "$1" "$2"; }

echo "# $(date -u +%F) on $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB; ${SECS}s per run"

# --- policy: postgrey vs postern-policyd (SQLite) -----------------------------------------
PG=$(port); mkdir -p "$W/postgrey"; chown postgrey:postgrey "$W/postgrey"
postgrey --inet=127.0.0.1:$PG --dbdir="$W/postgrey" --pidfile="$W/postgrey/pid" --user=postgrey --group=postgrey \
    --whitelist-clients=/etc/postgrey/whitelist_clients --whitelist-recipients=/etc/postgrey/whitelist_recipients \
    >"$W/postgrey.log" 2>&1 & PIDS+=($!); PG_PID=$!
OP=$(port)
printf 'state_dir = "%s"\n[[listen]]\naddress = "inet:127.0.0.1:%s"\n' "$W/policyd" "$OP" > "$W/policyd.toml"
"$B/postern-policyd" -c "$W/policyd.toml" 2>"$W/policyd.log" & PIDS+=($!); OP_PID=$!
wait_port $PG; wait_port $OP
for mix in new known; do
    for c in 1 8; do
        row "postgrey        policy $mix c=$c" "$("$B/policy" 127.0.0.1:$PG -c $c -d $SECS --mix $mix --pid $PG_PID)"
        row "postern-policyd policy $mix c=$c" "$("$B/policy" 127.0.0.1:$OP -c $c -d $SECS --mix $mix --pid $OP_PID)"
    done
done

# --- SRS: postsrsd 1.x vs postern-srsd (tcp_table), postern-srsd (socketmap) -------------------
head -c 32 /dev/urandom | base64 > "$W/srs.secret"; chmod 600 "$W/srs.secret"
SF=$(port); SR=$(port)
postsrsd -4 -l 127.0.0.1 -f$SF -r$SR -d fwd.example -s"$W/srs.secret" >"$W/postsrsd.log" 2>&1 & PIDS+=($!); PS_PID=$!
OF=$(port); OR=$(port); OS=$(port)
printf 'state_dir = "%s"\nsrs_domain = "fwd.example"\nsecrets_file = "%s"\nforward_listen = "inet:127.0.0.1:%s"\nreverse_listen = "inet:127.0.0.1:%s"\nsocketmap_listen = "inet:127.0.0.1:%s"\n' \
    "$W/srsd" "$W/srs.secret" "$OF" "$OR" "$OS" > "$W/srsd.toml"
"$B/postern-srsd" -c "$W/srsd.toml" 2>"$W/srsd.log" & PIDS+=($!); OS_PID=$!
wait_port $SF; wait_port $OF; wait_port $OS
for c in 1 8; do
    row "postsrsd      tcp_table forward c=$c" "$("$B/tcp-table" 127.0.0.1:$SF -c $c -d $SECS --pid $PS_PID)"
    row "postern-srsd  tcp_table forward c=$c" "$("$B/tcp-table" 127.0.0.1:$OF -c $c -d $SECS --pid $OS_PID)"
    row "postern-srsd  socketmap forward c=$c" "$("$B/socketmap" 127.0.0.1:$OS -c $c -d $SECS --pid $OS_PID)"
done

# --- milter: opendkim vs postern-milter, verifying (unsigned 4 KB message) and signing ---------
# Both get their DNS from the test server serving tests/fixtures/dns/example.test.zone, so no
# run waits on the Internet. opendkim gets one connection and is restarted before each run
# (Debian 12's opendkim wedges under concurrent connections; shared/reference/README.md).
DP=$(port)
"$B/test-dns" --listen 127.0.0.1:$DP tests/fixtures/dns/example.test.zone 2>"$W/dns.log" & PIDS+=($!)
mkdir -p "$W/opendkim"
cp tests/fixtures/dkim/sel.example.test.pem "$W/opendkim/sel.private"; chmod 600 "$W/opendkim/sel.private"
printf 'server:\n    local-zone: "test." nodefault\n' > "$W/opendkim/unbound.conf"
OK=$(port)
printf '%s\n' "Syslog no" "Mode sv" "Socket inet:$OK@127.0.0.1" "PidFile $W/opendkim/opendkim.pid" \
    "Domain example.test" "Selector sel" "KeyFile $W/opendkim/sel.private" "InternalHosts csl:127.0.0.2" \
    "Canonicalization relaxed/simple" "Nameservers 127.0.0.1@$DP" \
    "ResolverConfiguration $W/opendkim/unbound.conf" "RequireSafeKeys false" > "$W/opendkim/opendkim.conf"
OK_PID=
start_opendkim() {
    if [ -n "$OK_PID" ]; then kill "$OK_PID" 2>/dev/null || true; wait "$OK_PID" 2>/dev/null || true; fi
    opendkim -f -x "$W/opendkim/opendkim.conf" >>"$W/opendkim.log" 2>&1 & PIDS+=($!); OK_PID=$!
    wait_port $OK
}
OM=$(port)
printf 'state_dir = "%s"\nlisten = "inet:127.0.0.1:%s"\n[dns]\nnameservers = ["127.0.0.1:%s"]\n' "$W/milter" "$OM" "$DP" > "$W/milter.toml"
"$B/postern-milter" -c "$W/milter.toml" 2>"$W/milter.log" & PIDS+=($!); OM_PID=$!
wait_port $OM
start_opendkim
row "opendkim       milter verify c=1" "$("$B/milter" 127.0.0.1:$OK -c 1 -d $SECS --pid $OK_PID)"
start_opendkim
row "opendkim       milter sign c=1" "$("$B/milter" 127.0.0.1:$OK -c 1 -d $SECS --sign --client-ip 127.0.0.2 --from-domain example.test --pid $OK_PID)"
for c in 1 16; do
    row "postern-milter milter verify c=$c" "$("$B/milter" 127.0.0.1:$OM -c $c -d $SECS --pid $OM_PID)"
done
