# tests/bench/policy.sh: greylisting, postgrey vs postern-policyd.
# Sourced by tests/bench.sh, which defines B (release binaries), W (work dir), SECS, PIDS,
# port, wait_port and row.

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


# The same daemon on Redis (the store several MX hosts share), beside the SQLite figures.
RP=$(port); mkdir -p "$W/redis"
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --dir "$W/redis" >"$W/redis.log" 2>&1 & PIDS+=($!); RS_PID=$!
OR=$(port)
printf 'state_dir = "%s"\n[[listen]]\naddress = "inet:127.0.0.1:%s"\n[greylist]\nstore = "redis://127.0.0.1:%s/"\n' "$W/policyd-redis" "$OR" "$RP" > "$W/policyd-redis.toml"
wait_port $RP
"$B/postern-policyd" -c "$W/policyd-redis.toml" 2>"$W/policyd-redis.log" & PIDS+=($!); OR_PID=$!
wait_port $OR
for mix in new known; do
    row "postern-policyd (redis) policy $mix c=8" "$("$B/policy" 127.0.0.1:$OR -c 8 -d $SECS --mix $mix --pid $OR_PID)"
done
kill "$PG_PID" "$OP_PID" "$OR_PID" "$RS_PID" 2>/dev/null || true
wait "$PG_PID" "$OP_PID" "$OR_PID" "$RS_PID" 2>/dev/null || true
