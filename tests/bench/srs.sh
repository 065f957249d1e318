# tests/bench/srs.sh: SRS, postsrsd vs postern-srsd (tcp_table and socketmap).
# Sourced by tests/bench.sh, which defines B (release binaries), W (work dir), SECS, PIDS,
# port, wait_port and row.

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
    row "postsrsd      tcp_table forward c=$c" "$(with_cpu "$B/tcp-table" 127.0.0.1:$SF -c $c -d $SECS --pid $PS_PID)"
    row "postern-srsd  tcp_table forward c=$c" "$(with_cpu "$B/tcp-table" 127.0.0.1:$OF -c $c -d $SECS --pid $OS_PID)"
    row "postern-srsd  socketmap forward c=$c" "$(with_cpu "$B/socketmap" 127.0.0.1:$OS -c $c -d $SECS --pid $OS_PID)"
done

kill "$PS_PID" "$OS_PID" 2>/dev/null || true
wait "$PS_PID" "$OS_PID" 2>/dev/null || true
