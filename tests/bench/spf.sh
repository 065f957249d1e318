# tests/bench/spf.sh: SPF, Debian's policyd-spf vs postern-policyd with only the SPF check.
# Sourced by tests/bench.sh, which defines B (release binaries), W (work dir), SECS, PIDS,
# port, wait_port and row.
#
# Same requests (the generator's --mix spf: pass by ip4/a/mx/include, fail, softfail, neutral,
# no record; HELO and MAIL FROM checked), same DNS server (test-dns serving tests/bench/spf.zone),
# default settings for both. Postfix runs policyd-spf as a spawn(8) service, one long-lived
# process per smtpd connection that answers many requests; socat plays spawn here (one process
# per TCP connection) and the generator keeps its connections open, so both servers are
# measured the same way: c connections = c long-lived policyd-spf processes, or c connections
# to the one postern-policyd. Before each measured run, a short run warms postern-policyd's DNS
# cache (policyd-spf keeps no cache between requests; it asks test-dns every time, over
# loopback). policyd-spf's RSS is per process (one per connection), sampled mid-run. Its start
# (~0.1 s of Python imports per process) falls inside the timed run: about 1% of a 10 s run at
# one connection, a few % at eight on two cores.

# --- SPF: policyd-spf (socat as spawn) vs postern-policyd (checks = ["spf"]) -------------------
spf_missing=""
command -v socat >/dev/null || spf_missing="socat"
[ -x /usr/bin/policyd-spf ] || spf_missing="$spf_missing postfix-policyd-spf-python"
if [ -n "$spf_missing" ]; then
    row "spf: skipped" "not installed:$spf_missing (tests/setup.sh installs them)"
    return 0
fi
SPF_DNS=$(port)
"$B/test-dns" --listen 127.0.0.1:$SPF_DNS tests/bench/spf.zone 2>"$W/spf-dns.log" & PIDS+=($!); SPF_DNS_PID=$!
wait_port $SPF_DNS

# policyd-spf reads only /etc/resolv.conf (pydns, port 53): point pydns at test-dns after import,
# as policyd/tests/spf_differential.rs does. Default settings; it logs to syslog (none here).
printf 'debugLevel = 1\n' > "$W/policyd-spf.conf"
cat > "$W/policyd-spf.py" <<EOF
import sys, DNS, spf
DNS.defaults['server'] = ['127.0.0.1']
DNS.defaults['port'] = $SPF_DNS
from spf_engine import policyd_spf
sys.argv = ['policyd-spf', '$W/policyd-spf.conf']
policyd_spf.main()
EOF
PSPF=$(port)
socat TCP-LISTEN:$PSPF,bind=127.0.0.1,fork,reuseaddr,nodelay \
    EXEC:"/usr/bin/python3 $W/policyd-spf.py" 2>"$W/socat.log" & PIDS+=($!); SOCAT_PID=$!

OSPF=$(port)
printf 'state_dir = "%s"\n[[listen]]\naddress = "inet:127.0.0.1:%s"\nchecks = ["spf"]\n[dns]\nnameservers = ["127.0.0.1:%s"]\n[greylist]\nstore = "memory:"\n' \
    "$W/policyd-spf-only" "$OSPF" "$SPF_DNS" > "$W/policyd-spf-only.toml"
"$B/postern-policyd" -c "$W/policyd-spf-only.toml" 2>"$W/policyd-spf-only.log" & PIDS+=($!); OSPF_PID=$!
wait_port $PSPF; wait_port $OSPF

# Before anything is timed: both answer the mix's requests, byte for byte the same.
spf_ask() { # port sender-domain -> the answer
    printf 'request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address=192.0.2.25\nclient_name=mail.sender.example\nhelo_name=mail.sender.example\nsender=user1@%s\nrecipient=rcpt1@dest.example\ninstance=check.%s\n\n' \
        "$2" "$2" | socat -t 10 - TCP:127.0.0.1:$1 | tr -d '\n'
}
agree=0
for d in pass-ip4 pass-a pass-mx pass-include fail softfail neutral none; do
    theirs=$(spf_ask $PSPF $d.spf.example); ours=$(spf_ask $OSPF $d.spf.example)
    if [ -n "$ours" ] && [ "$theirs" = "$ours" ]; then agree=$((agree + 1)); else
        row "spf answers differ for $d" "policyd-spf: $theirs | postern: $ours"; fi
done
row "spf answers identical" "$agree of 8 sender domains"

# The policyd-spf processes: socat forks a child per connection, which runs python as its own
# child.
spf_processes() {
    local child
    for child in $(pgrep -P "$SOCAT_PID"); do pgrep -P "$child" || true; done
}
# Peak RSS (VmHWM, kB) of the largest policyd-spf process, sampled mid-run.
spf_processes_rss() {
    local max=0 pid kb
    for pid in $(spf_processes); do
        kb=$(awk '/^VmHWM:/{print $2}' /proc/$pid/status 2>/dev/null || echo 0)
        [ "${kb:-0}" -gt "$max" ] && max=$kb
    done
    echo "$max"
}

for c in 1 8; do
    out="$W/spf-theirs.out"
    "$B/policy" 127.0.0.1:$PSPF -c $c -d $SECS --mix spf > "$out" &
    gen=$!
    sleep "$(awk -v s="$SECS" 'BEGIN{print s/2}')"
    rss=$(spf_processes_rss); procs=$(spf_processes | wc -l)
    wait $gen
    row "policyd-spf     spf c=$c" "$(cat "$out"), per-process peak RSS $(awk -v k="$rss" 'BEGIN{printf "%.1f", k/1024}') MB x $procs processes, load $(cut -d' ' -f1-3 /proc/loadavg)"
    "$B/policy" 127.0.0.1:$OSPF -c $c -d 1 --mix spf >/dev/null
    row "postern-policyd spf c=$c" "$("$B/policy" 127.0.0.1:$OSPF -c $c -d $SECS --mix spf --pid $OSPF_PID), load $(cut -d' ' -f1-3 /proc/loadavg)"
done
# The round trip alone, at one connection: a client in skip_addresses (loopback, both servers'
# default) is answered without any SPF work. What a server can reach at c=1 is bounded by this
# floor (the loopback round trip and the generator's own share of the two cores).
row "policyd-spf     skipped client c=1" "$("$B/policy" 127.0.0.1:$PSPF -c 1 -d $SECS --mix spf --client 127.0.0.1)"
row "postern-policyd skipped client c=1" "$("$B/policy" 127.0.0.1:$OSPF -c 1 -d $SECS --mix spf --client 127.0.0.1 --pid $OSPF_PID)"
row "postern-policyd spf decisions" "$(grep -c 'check="spf"' "$W/policyd-spf-only.log" || true) logged; outcomes: $(grep -o 'reason=spf [a-z_]*' "$W/policyd-spf-only.log" | sed 's/reason=spf //' | sort | uniq -c | tr -s ' ' | tr '\n' ';')"

kill "$SOCAT_PID" "$OSPF_PID" "$SPF_DNS_PID" 2>/dev/null || true
wait "$SOCAT_PID" "$OSPF_PID" "$SPF_DNS_PID" 2>/dev/null || true
