#!/bin/sh
# Install the real programs the tests talk to (swaks with TLS, Postfix's smtp-sink/smtp-source).
# Postfix is preseeded to "No configuration" so that no system MTA starts on port 25.
# A missing peer is an error, not a skip: this script fails loudly if it cannot install one.
set -e
need=""
command -v swaks >/dev/null 2>&1 || need="$need swaks"
command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || need="$need postfix"
# swaks --tls needs Net::SSLeay (and IO::Socket::SSL); without them it silently lacks TLS.
perl -MNet::SSLeay -MIO::Socket::SSL -e1 >/dev/null 2>&1 || need="$need libnet-ssleay-perl libio-socket-ssl-perl"
[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "install-peers: need root to install:$need" >&2
    exit 1
fi
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends $need >/dev/null
