# tests/bench/dmarc.sh: DKIM verification + DMARC with aggregate-report recording, opendkim +
# opendmarc (chained as Postfix chains `smtpd_milters = opendkim, opendmarc`) vs postern-milter
# (one milter doing both, records in its SQLite store).
# Sourced by tests/bench.sh, which defines B (release binaries), W (work dir), SECS, PIDS,
# port, wait_port and row.
#
# The message: 4 KB from example.test, DKIM-signed (relaxed/relaxed, rsa-sha256, the fixture key
# tests/fixtures/dkim/sel.example.test.pem), envelope sender alice@example.test, client
# 192.0.2.25: SPF pass, DKIM pass, DMARC pass for a p=reject domain with rua, so both sides
# write a report record per message (opendmarc: its HistoryFile; postern: the SQLite store).
# All DNS comes from the test server serving tests/fixtures/dns/example.test.zone: postern-milter
# and opendkim ask it on a free port; opendmarc (libresolv, /etc/resolv.conf only) asks a second
# instance on port 53 of a free loopback address, through a resolv.conf bind-mounted in its own
# mount namespace (the host's is never touched). Debian 12's opendkim wedges under concurrent
# connections, so the chain runs with one connection and opendkim is restarted before each run.
# Caveat: test-dns answers NXDOMAIN without an SOA, which hickory does not cache, so
# postern-milter still sends one query per message (mail-auth's RFC 9989 tree walk asks
# `_dmarc.test`); with a real server's negative answers that query is cached too.

DMARC_ZONE=tests/fixtures/dns/example.test.zone
DMARC_DNS_PORT=$(port)
"$B/test-dns" --listen 127.0.0.1:$DMARC_DNS_PORT $DMARC_ZONE 2>"$W/dmarc-dns.log" & PIDS+=($!); DMARC_DNS_PID=$!
# A loopback address of our own for port 53 (127.0.0.0/8 is all ours on lo).
DMARC_RESOLV_IP=127.$((RANDOM % 200 + 20)).$((RANDOM % 250 + 1)).53
"$B/test-dns" --listen $DMARC_RESOLV_IP:53 $DMARC_ZONE 2>"$W/dmarc-dns53.log" & PIDS+=($!); DMARC_DNS53_PID=$!
mkdir -p "$W/dmarc"
printf 'nameserver %s\noptions attempts:1 timeout:2\n' "$DMARC_RESOLV_IP" > "$W/dmarc/resolv.conf"

# The signed message (dkimpy, installed by tests/setup.sh).
python3 - "$W/dmarc/message.eml" <<'EOF'
import sys, dkim
head = (b"From: Alice <alice@example.test>\r\nTo: Bob <bob@dest.example>\r\n"
        b"Subject: dmarc load test message\r\nDate: Wed, 25 Nov 2026 07:00:00 +0000\r\n"
        b"Message-ID: <load.dmarc@example.test>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n")
body = b""
while len(head) + len(body) < 4096:
    body += b"The quick brown fox jumps over the lazy dog, again and again and again.\r\n"
key = open("tests/fixtures/dkim/sel.example.test.pem", "rb").read()
sig = dkim.sign(head + body, b"sel", b"example.test", key,
                canonicalize=(b"relaxed", b"relaxed"),
                include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
open(sys.argv[1], "wb").write(sig + head + body)
EOF
DMARC_LOAD=(--message "$W/dmarc/message.eml" --from-domain example.test --client-ip 192.0.2.25)

# --- opendkim (verifying, AuthservID mx.test.example) + opendmarc (trusting it) ----------------
# Both on TCP (inet:, as deploy/postfix/main.cf writes opendkim's port), then both on unix sockets
# (local:, Debian's default for both packages). On TCP every reply that carries a header change
# stalls ~40 ms (libmilter's several small writes meet the MTA's delayed ACK; Postfix sees the
# same), so the unix-socket rows are the peers' best case.
printf 'server:\n    local-zone: "test." nodefault\n' > "$W/dmarc/unbound.conf"
echo 127.0.0.2 > "$W/dmarc/ignore.hosts"
DMARC_OK_PID=; DMARC_OD_PID=
dmarc_wait_socket() { # inet port or unix path
    case $1 in
        /*) for _ in $(seq 200); do
                python3 -c 'import socket,sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$1" 2>/dev/null && return 0
                sleep 0.05
            done; echo "nothing on $1" >&2; return 1;;
        *) wait_port "$1";;
    esac
}
dmarc_socket_spec() { case $1 in /*) echo "local:$1";; *) echo "inet:$1@127.0.0.1";; esac; }
dmarc_start_opendkim() { # port or socket path
    if [ -n "$DMARC_OK_PID" ]; then kill "$DMARC_OK_PID" 2>/dev/null || true; wait "$DMARC_OK_PID" 2>/dev/null || true; fi
    case $1 in /*) rm -f "$1";; esac
    printf '%s\n' "Syslog no" "Mode v" "Socket $(dmarc_socket_spec "$1")" "PidFile $W/dmarc/opendkim.pid" \
        "AuthservID mx.test.example" "Nameservers 127.0.0.1@$DMARC_DNS_PORT" \
        "ResolverConfiguration $W/dmarc/unbound.conf" > "$W/dmarc/opendkim.conf"
    opendkim -f -x "$W/dmarc/opendkim.conf" >>"$W/dmarc/opendkim.log" 2>&1 & PIDS+=($!); DMARC_OK_PID=$!
    dmarc_wait_socket "$1"
}
dmarc_start_opendmarc() { # port or socket path
    if [ -n "$DMARC_OD_PID" ]; then kill "$DMARC_OD_PID" 2>/dev/null || true; wait "$DMARC_OD_PID" 2>/dev/null || true; fi
    case $1 in /*) rm -f "$1";; esac
    printf '%s\n' "Syslog false" "Socket $(dmarc_socket_spec "$1")" "PidFile $W/dmarc/opendmarc.pid" \
        "AuthservID mx.test.example" "TrustedAuthservIDs mx.test.example" \
        "IgnoreHosts $W/dmarc/ignore.hosts" "HistoryFile $W/dmarc/opendmarc.history" \
        "RejectFailures false" "FailureReports false" "SPFSelfValidate true" "RequiredHeaders false" \
        "PublicSuffixList /usr/share/publicsuffix/public_suffix_list.dat" > "$W/dmarc/opendmarc.conf"
    unshare --mount --propagation private -- sh -c 'mount --bind "$0" /etc/resolv.conf && exec "$@"' \
        "$W/dmarc/resolv.conf" opendmarc -f -c "$W/dmarc/opendmarc.conf" >>"$W/dmarc/opendmarc.log" 2>&1 &
    PIDS+=($!); DMARC_OD_PID=$!
    dmarc_wait_socket "$1"
}

# --- postern-milter: DKIM verification + DMARC + report records in SQLite -----------------------
DMARC_OM=$(port)
printf 'state_dir = "%s"\nlisten = "inet:127.0.0.1:%s"\nauthserv_id = "mx.test.example"\n[dns]\nnameservers = ["127.0.0.1:%s"]\n' \
    "$W/dmarc/milter" "$DMARC_OM" "$DMARC_DNS_PORT" > "$W/dmarc/milter.toml"
"$B/postern-milter" -c "$W/dmarc/milter.toml" 2>"$W/dmarc/milter.log" & PIDS+=($!); DMARC_OM_PID=$!
wait_port $DMARC_OM

# Warm-up (DNS caches, SQLite file, opendkim's first connection), then the measured runs.
"$B/milter" 127.0.0.1:$DMARC_OM -c 1 -n 200 "${DMARC_LOAD[@]}" --expect dmarc=pass >/dev/null
for transport in inet unix; do
    if [ $transport = inet ]; then ok=$(port); od=$(port); else ok=$W/dmarc/opendkim.sock; od=$W/dmarc/opendmarc.sock; fi
    dmarc_start_opendmarc "$od"
    dmarc_start_opendkim "$ok"
    "$B/milter" "$(dmarc_socket_spec "$ok")" --chain "$(dmarc_socket_spec "$od")" -c 1 -n 10 "${DMARC_LOAD[@]}" --expect dkim=pass >/dev/null
    dmarc_start_opendkim "$ok"
    row "opendkim+opendmarc chain $transport c=1" \
        "$("$B/milter" "$(dmarc_socket_spec "$ok")" --chain "$(dmarc_socket_spec "$od")" -c 1 -d $SECS "${DMARC_LOAD[@]}" --expect dkim=pass --pid $DMARC_OD_PID)"
    row "  loadavg after" "$(cut -d' ' -f1-3 /proc/loadavg)"
done
for c in 1 16; do
    row "postern-milter dmarc+sqlite inet c=$c" \
        "$("$B/milter" 127.0.0.1:$DMARC_OM -c $c -d $SECS "${DMARC_LOAD[@]}" --expect dmarc=pass --pid $DMARC_OM_PID)"
    row "  loadavg after" "$(cut -d' ' -f1-3 /proc/loadavg)"
done
# What each side recorded for reports (sanity: one per message).
row "  opendmarc history records" "$(grep -c '^job ' "$W/dmarc/opendmarc.history" 2>/dev/null || echo 0)"
row "  postern-milter report store" "$("$B/postern-milter" -c "$W/dmarc/milter.toml" reports show | head -1)"

for p in $DMARC_OM_PID $DMARC_OD_PID $DMARC_OK_PID $DMARC_DNS_PID $DMARC_DNS53_PID; do kill "$p" 2>/dev/null || true; done
for p in $DMARC_OM_PID $DMARC_OD_PID $DMARC_OK_PID $DMARC_DNS_PID $DMARC_DNS53_PID; do wait "$p" 2>/dev/null || true; done
