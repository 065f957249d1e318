#!/usr/bin/env bash
# deploy/demo.sh [--once] [--release]
#
# Installs what is missing, builds, and starts the three Postern daemons on their embedded
# defaults (SQLite state, the peers' loopback ports 10023, 8891, 10001/10002) plus a private
# Postfix on loopback wired to them with the main.cf lines of deploy/postfix/main.cf. Sends demo
# messages through it and prints what each daemon did and what arrived at the next hop. Keeps
# everything running until Ctrl-C (try your own: swaks --server 127.0.0.1:2525 ...); with
# --once it stops after the demo. Must run as root (Postfix's master insists).
set -eEuo pipefail
cd "$(dirname "$0")/.."
ONCE=0; PROFILE=debug; CARGO_PROFILE=()
for arg in "$@"; do
    case $arg in
        --once) ONCE=1 ;;
        --release) PROFILE=release; CARGO_PROFILE=(--release) ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "demo.sh: unknown argument $arg (try --help)" >&2; exit 64 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "demo.sh: run as root (Postfix's master refuses other users)" >&2; exit 1; }

SMTP_PORT=2525 SINK_PORT=2526 DNS_PORT=5353
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "installing what is missing"
bash tests/setup.sh
for port in 10023 8891 10001 10002 $SMTP_PORT $SINK_PORT $DNS_PORT; do
    if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
        echo "demo.sh: 127.0.0.1:$port is in use (a peer such as postgrey or opendkim running?); stop it first" >&2
        exit 1
    fi
done

say "building"
cargo build "${CARGO_PROFILE[@]}" --locked --ignore-rust-version --bins \
    -p postern-policyd -p postern-milter -p postern-srsd -p postern-tests
BIN=$PWD/target/$PROFILE

W=$(mktemp -d /tmp/postern-demo.XXXXXX)
chmod 755 "$W"
PIDS=()
cleanup() {
    [ -f "$W/postfix/etc/main.cf" ] && postfix -c "$W/postfix/etc" stop >/dev/null 2>&1 || true
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

say "starting the test DNS server, the next hop and the daemons (work dir $W)"
cat > "$W/demo.zone" <<'EOZ'
# Zones for the demo: the sending domains' SPF, DKIM and DMARC records live here.
demo.example       TXT "v=spf1 ip4:127.0.0.0/8 -all"
remote.example     TXT "v=spf1 ip4:127.0.0.0/8 ~all"
_dmarc.demo.example TXT "v=DMARC1; p=reject; rua=mailto:dmarc@demo.example"
mx.demo.example    A   127.0.0.1
EOZ
"$BIN/test-dns" --listen 127.0.0.1:$DNS_PORT "$W/demo.zone" 2>"$W/dns.log" & PIDS+=($!)
"$BIN/smtp-sink" --listen 127.0.0.1:$SINK_PORT --dir "$W/delivered" >"$W/sink.log" 2>&1 & PIDS+=($!)
for daemon in policyd milter srsd; do
    mkdir -p "$W/$daemon"
    {
        echo "state_dir = \"$W/$daemon/state\""
        [ $daemon = srsd ] && echo 'srs_domain = "demo.example"'
        [ $daemon = milter ] && echo 'authserv_id = "mx.demo.example"'
        echo '[dns]'
        echo "nameservers = [\"127.0.0.1:$DNS_PORT\"]"
    } > "$W/$daemon/$daemon.toml"
    "$BIN/postern-$daemon" -c "$W/$daemon/$daemon.toml" 2>"$W/$daemon.log" & PIDS+=($!)
done
for port in 10023 8891 10001 10002 $SINK_PORT; do
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
    (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null || { echo "nothing listens on $port:"; cat "$W"/*.log; exit 1; }
done

say "starting a private Postfix on 127.0.0.1:$SMTP_PORT"
P=$W/postfix
mkdir -p "$P/etc" "$P/spool" "$P/data"
chown postfix:postfix "$P/data"
sed -e "s/^smtp      inet  n       -       y       -       -       smtpd/127.0.0.1:$SMTP_PORT inet n - n - - smtpd/" \
    -e 's/^\(\S\+\s\+\S\+\s\+\S\+\s\+\S\+\s\+\)y\(\s\)/\1n\2/' /usr/share/postfix/master.cf.dist > "$P/etc/master.cf"
cat > "$P/etc/main.cf" <<EOC
compatibility_level = 3.6
queue_directory = $P/spool
data_directory = $P/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.demo.example
mydomain = demo.example
myorigin = demo.example
mydestination =
relay_domains = dest.example, demo.example
alias_maps =
alias_database =
local_recipient_maps =
inet_interfaces = loopback-only
inet_protocols = ipv4
# Our own client (127.0.0.1) is not in mynetworks, so the policy checks see it.
mynetworks = 127.0.0.2/32
relayhost = [127.0.0.1]:$SINK_PORT
smtp_dns_support_level = disabled
maillog_file_prefixes = /var, /dev/stdout, $P
maillog_file = $P/maillog
queue_run_delay = 1s
# --- Postern: the lines of deploy/postfix/main.cf ---
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination,
    check_policy_service inet:127.0.0.1:10023
smtpd_milters = inet:127.0.0.1:8891
non_smtpd_milters = \$smtpd_milters
milter_default_action = accept
milter_protocol = 6
sender_canonical_maps = tcp:127.0.0.1:10001
sender_canonical_classes = envelope_sender
recipient_canonical_maps = tcp:127.0.0.1:10002
recipient_canonical_classes = envelope_recipient, header_recipient
EOC
postfix -c "$P/etc" check
postfix -c "$P/etc" start
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$SMTP_PORT) 2>/dev/null && break; sleep 0.1; done

send() { # from to subject
    swaks --server 127.0.0.1:$SMTP_PORT --helo client.demo.example --from "$1" --to "$2" \
        --h-Subject "$3" --body "Hello from the Postern demo ($3)." 2>&1 | grep -E '^ *<[-~*]+ +[0-9]{3} ' | tail -3 | sed 's/^/    smtp: /' || true
}
delivered() { # count
    for _ in $(seq 100); do [ "$(ls "$W/delivered" 2>/dev/null | wc -l)" -ge "$1" ] && return 0; sleep 0.1; done
    echo "    (not delivered; maillog:)"; tail -5 "$P/maillog"; return 1
}
show() { # file
    grep -E '^(X-Envelope-From|X-Envelope-To|Subject|Authentication-Results|DKIM-Signature|Received-SPF|X-Greylist):' "$1" | sed 's/^/    arrived: /'
}

say "1. a message from a local sender: policy check, milter, canonical lookups; arrives unchanged"
send alice@demo.example bob@dest.example "local sender"
delivered 1 && show "$W/delivered/0001.eml"

say "2. a message from a foreign sender relayed onwards: the envelope sender gets SRS-rewritten"
send carol@remote.example dave@dest.example "forwarded"
delivered 2 && show "$W/delivered/0002.eml"
SRS=$(sed -n 's/^X-Envelope-From: <\(.*\)>/\1/p' "$W/delivered/0002.eml")

say "3. a bounce to $SRS goes back to the original sender"
swaks --server 127.0.0.1:$SMTP_PORT --helo mx.dest.example --from '<>' --to "$SRS" \
    --h-Subject "bounce" --body "Delivery failed." 2>&1 | grep -E '^ *<[-~*]+ +[0-9]{3} ' | tail -1 | sed 's/^/    smtp: /' || true
delivered 3 && show "$W/delivered/0003.eml"

say "what each daemon did"
for daemon in policyd milter srsd; do
    echo "  postern-$daemon:"
    grep -E 'decision|message passed|rewritten|not rewritten|does not verify' "$W/$daemon.log" | sed 's/^/    /' | tail -6
done

if [ $ONCE = 1 ]; then
    say "demo done (--once)"
    exit 0
fi
say "running: smtpd 127.0.0.1:$SMTP_PORT, daemons on 10023/8891/10001/10002, messages in $W/delivered; Ctrl-C stops"
while true; do sleep 1; done
