#!/bin/sh
# socat_bridge.sh: the first process inside a bw-claude / bw-gemini sandbox started with
# --filter-network.  bw_lib.py runs it; it is not meant to be run by hand.
#
# Usage: socat_bridge.sh SOCAT SOCKET COMMAND [ARG...]
#
# Starts socat listening on 127.0.0.1 and forwarding every connection to the filtering
# proxy's unix SOCKET, waits until socat listens, points the proxy variables at it, then
# execs COMMAND.  The port is 0, so the kernel picks a free one: without --unshare-net
# this is the host's loopback, where a fixed port could collide or be taken first.
# socat says which port it got ("listening on AF=2 127.0.0.1:PORT") on stderr, which is
# read until that line and then drained, so socat never blocks on a full pipe; the port
# comes back through a FIFO.
# -b: 256 KiB buffers (8 KiB default halves throughput); -t: wait an hour, not 0.5 s, for
# the reply after a client half-closes.  bwrap --unshare-pid ends socat with the sandbox.
set -eu

if [ "$#" -lt 3 ]; then
    echo "usage: socat_bridge.sh SOCAT SOCKET COMMAND [ARG...]" >&2
    exit 2
fi
socat=$1
socket=$2
shift 2

# socat gets a session of its own when setsid(1) is there: it handles SIGINT itself and
# would otherwise die of the Ctrl-C meant for the CLI.
detach=
if command -v setsid >/dev/null 2>&1; then
    detach=setsid
fi

dir=$(mktemp -d)
mkfifo "$dir/port"
$detach "$socat" -d -d -b 1048576 -t 3600 \
    "TCP4-LISTEN:0,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$socket" 2>&1 >/dev/null |
    {
        port=
        while IFS= read -r line; do
            case $line in
            *" listening on "*)
                port=${line##*:}
                break
                ;;
            *" E "*)
                printf 'socat_bridge.sh: %s\n' "$line" >&2
                ;;
            esac
        done
        printf '%s\n' "$port" >"$dir/port"
        exec cat >/dev/null
    } &

# The reader writes the port, or an empty line if socat ended first, so this read returns
# as soon as socat listens, without polling.
IFS= read -r port <"$dir/port" || port=
rm -rf "$dir"
case $port in
'' | *[!0-9]*)
    echo "socat_bridge.sh: could not read socat's port (got '$port')" >&2
    exit 1
    ;;
esac

http="http://127.0.0.1:$port"
socks="socks5h://127.0.0.1:$port"
local_names="localhost,127.0.0.1,::1"
export HTTPS_PROXY="$http" HTTP_PROXY="$http" https_proxy="$http" http_proxy="$http"
export ALL_PROXY="$socks" all_proxy="$socks"
export NO_PROXY="$local_names" no_proxy="$local_names"
export NODE_USE_ENV_PROXY=1
exec "$@"
