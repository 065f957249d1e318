#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian 12 machine, and nothing if it is
# all there already: Postfix and swaks, the servers the storage tests start (Redis, PostgreSQL,
# MariaDB), db-util (postgrey database import), and the peers the interop tests and benchmarks
# compare against (postgrey, policyd-spf, opendkim, opendmarc, postsrsd). No package's postinst
# is allowed to start a daemon (there is no systemd here, and tests start what they need).
set -euo pipefail
packages=(
    postfix swaks
    redis-server postgresql mariadb-server
    db-util libxml2-utils
    postgrey postsrsd opendkim opendkim-tools opendmarc postfix-policyd-spf-python
    iproute2 procps socat time
)
# dkimpy (and PyNaCl for its Ed25519) for the DKIM interoperability tests, from PyPI.
if ! python3 -c 'import dkim, nacl' 2>/dev/null; then
    echo "setup: installing dkimpy and pynacl (pip)"
    python3 -m pip install --quiet dkimpy pynacl
fi
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup: all ${#packages[@]} packages present"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "setup: missing ${missing[*]}; run as root to install them" >&2
    exit 1
fi
echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo "postfix postfix/mailname string mx.test.example" | debconf-set-selections
had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
if [ $had_policy = 0 ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
fi
cleanup() { if [ $had_policy = 0 ]; then rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's postfix package leaves no main.cf with "No configuration"; the private instances
# bring their own, but postfix tools want the default one to exist.
[ -e /etc/postfix/main.cf ] || cp /usr/share/postfix/main.cf.debian /etc/postfix/main.cf 2>/dev/null || touch /etc/postfix/main.cf
echo "setup: done"
