# tests/bench/dkim.sh: DKIM, opendkim vs postern-milter.
# Sourced by tests/bench.sh, which defines B (release binaries), W (work dir), SECS, PIDS,
# port, wait_port and row.

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
