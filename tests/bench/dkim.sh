# tests/bench/dkim.sh: DKIM, opendkim vs postern-milter, like for like.
# Sourced by tests/bench.sh, which defines B (release binaries), W (work dir), SECS, PIDS,
# port, wait_port and row.
#
# Both milters sign with the same RSA-2048 key (tests/fixtures/dkim/, published as
# sel._domainkey.example.test in tests/fixtures/dns/example.test.zone) and get the same 4 KB
# message; both get their DNS from test-dns, so no run waits on the Internet. postern-milter runs
# with `[dmarc] enabled = false`: DKIM only, as opendkim. Verify rows use that message unsigned
# (no DNS at all) and signed with the key (one cached key lookup, an RSA verification). opendkim
# is restarted before each run (Debian 12's opendkim wedges under concurrent connections;
# shared/reference/README.md); if its c=16 runs fail, the row shows the errors.
# The in-process rows sign the same message with mail-auth directly (`dkim-sign`, no milter
# protocol): the bound the Ed25519 milter rows are held against.

row "load average before dkim" "$(cat /proc/loadavg)"
DP=$(port)
"$B/test-dns" --listen 127.0.0.1:$DP tests/fixtures/dns/example.test.zone 2>"$W/dns.log" & PIDS+=($!); DNS_PID=$!
mkdir -p "$W/dkim"
cp tests/fixtures/dkim/sel.example.test.pem "$W/dkim/sel.private"; chmod 600 "$W/dkim/sel.private"
"$B/postern-milter" keygen --domain example.test --selector ed --algorithm ed25519 --dir "$W/dkim" >/dev/null
"$B/dkim-sign" "$W/dkim/sel.private" --domain example.test --selector sel -d 0 --write "$W/dkim/signed.eml" >/dev/null

# --- in process: mail-auth signing the same message, no milter ------------------------------
for t in 1 2; do
    row "mail-auth      in-process sign ed25519 t=$t" "$("$B/dkim-sign" "$W/dkim/ed.private" --domain example.test --selector ed -d $SECS -c $t)"
done
for t in 1 2; do
    row "mail-auth      in-process sign rsa t=$t" "$("$B/dkim-sign" "$W/dkim/sel.private" --domain example.test --selector sel -d $SECS -c $t)"
done

# --- opendkim -------------------------------------------------------------------------------
printf 'server:\n    local-zone: "test." nodefault\n' > "$W/dkim/unbound.conf"
OK=$(port)
printf '%s\n' "Syslog no" "Mode sv" "Socket inet:$OK@127.0.0.1" "PidFile $W/dkim/opendkim.pid" \
    "Domain example.test" "Selector sel" "KeyFile $W/dkim/sel.private" "InternalHosts csl:127.0.0.2" \
    "Canonicalization relaxed/simple" "Nameservers 127.0.0.1@$DP" \
    "ResolverConfiguration $W/dkim/unbound.conf" "RequireSafeKeys false" > "$W/dkim/opendkim.conf"
OK_PID=
start_opendkim() {
    if [ -n "$OK_PID" ]; then kill "$OK_PID" 2>/dev/null || true; wait "$OK_PID" 2>/dev/null || true; fi
    opendkim -f -x "$W/dkim/opendkim.conf" >>"$W/opendkim.log" 2>&1 & PIDS+=($!); OK_PID=$!
    wait_port $OK
}
# --expect: a message counts only if its verification passed or it got its signature.
VERIFY_SIGNED=(--message "$W/dkim/signed.eml" --from-domain example.test --expect dkim=pass)
SIGN=(--sign --client-ip 127.0.0.2 --from-domain example.test --expect a=rsa-sha256)
SIGN_ED=(--sign --client-ip 127.0.0.2 --from-domain example.test --expect a=ed25519-sha256)
start_opendkim
row "opendkim       verify unsigned c=1" "$(with_cpu "$B/milter" 127.0.0.1:$OK -c 1 -d $SECS --pid $OK_PID)"
for c in 1 16; do
    start_opendkim
    row "opendkim       verify signed c=$c" "$(with_cpu "$B/milter" 127.0.0.1:$OK -c $c -d $SECS "${VERIFY_SIGNED[@]}" --pid $OK_PID)"
done
for c in 1 16; do
    start_opendkim
    row "opendkim       sign rsa c=$c" "$(with_cpu "$B/milter" 127.0.0.1:$OK -c $c -d $SECS "${SIGN[@]}" --pid $OK_PID)"
done
kill "$OK_PID" 2>/dev/null || true; wait "$OK_PID" 2>/dev/null || true

# --- postern-milter: the RSA key, then an Ed25519 key alone -------------------------------
milter_config() { # port selector key-file [top-level line]
    printf 'state_dir = "%s"\nlisten = "inet:127.0.0.1:%s"\n%s\n[dns]\nnameservers = ["127.0.0.1:%s"]\n[dmarc]\nenabled = false\n[dkim]\ndomain = ["example.test"]\nselector = "%s"\nkey_file = "%s"\n' \
        "$W/dkim/state" "$1" "${4:-}" "$DP" "$2" "$3"
}
OM=$(port)
milter_config $OM sel "$W/dkim/sel.private" > "$W/dkim/milter-rsa.toml"
"$B/postern-milter" -c "$W/dkim/milter-rsa.toml" 2>"$W/milter-rsa.log" & PIDS+=($!); OM_PID=$!
wait_port $OM
for c in 1 16; do
    row "postern-milter verify unsigned c=$c" "$(with_cpu "$B/milter" 127.0.0.1:$OM -c $c -d $SECS --pid $OM_PID)"
done
for c in 1 16; do
    row "postern-milter verify signed c=$c" "$(with_cpu "$B/milter" 127.0.0.1:$OM -c $c -d $SECS "${VERIFY_SIGNED[@]}" --pid $OM_PID)"
done
for c in 1 16; do
    row "postern-milter sign rsa c=$c" "$(with_cpu "$B/milter" 127.0.0.1:$OM -c $c -d $SECS "${SIGN[@]}" --pid $OM_PID)"
done
kill "$OM_PID" 2>/dev/null || true; wait "$OM_PID" 2>/dev/null || true
OE=$(port)
milter_config $OE ed "$W/dkim/ed.private" > "$W/dkim/milter-ed.toml"
"$B/postern-milter" -c "$W/dkim/milter-ed.toml" 2>"$W/milter-ed.log" & PIDS+=($!); OE_PID=$!
wait_port $OE
for c in 1 16; do
    row "postern-milter sign ed25519 c=$c" "$(with_cpu "$B/milter" 127.0.0.1:$OE -c $c -d $SECS "${SIGN_ED[@]}" --pid $OE_PID)"
done
kill "$OE_PID" 2>/dev/null || true; wait "$OE_PID" 2>/dev/null || true
# The same with `worker_threads = 1`: one thread for the protocol and all the signing, the other
# core left to the generator (as to Postfix on a real host).
O1=$(port)
milter_config $O1 ed "$W/dkim/ed.private" 'worker_threads = 1' > "$W/dkim/milter-ed1.toml"
"$B/postern-milter" -c "$W/dkim/milter-ed1.toml" 2>"$W/milter-ed1.log" & PIDS+=($!); O1_PID=$!
wait_port $O1
for c in 1 16; do
    row "postern-milter sign ed25519 1 thread c=$c" "$(with_cpu "$B/milter" 127.0.0.1:$O1 -c $c -d $SECS "${SIGN_ED[@]}" --pid $O1_PID)"
done
kill "$O1_PID" "$DNS_PID" 2>/dev/null || true; wait "$O1_PID" "$DNS_PID" 2>/dev/null || true
row "load average after dkim" "$(cat /proc/loadavg)"
