#!/bin/sh
# socat_bridge.sh: the first process inside a bw-claude / bw-gemini sandbox started with
# --filter-network.  bw_lib.py runs it; it is not meant to be run by hand.
#
# Usage: socat_bridge.sh SOCAT SOCKET HOSTPORTS COMMAND [ARG...]
#
# Starts socat listening on 127.0.0.1 and forwarding every connection to the filtering
# proxy's unix SOCKET, points the proxy variables at it, then execs COMMAND.  The port is
# 0, so the kernel picks a free one: with --share-net this is the host's loopback, where a
# fixed port could collide or be taken first.
# HOSTPORTS is a space-separated list of PORT:HOSTPORT (may be empty, --host-port): for
# each, one more socat listens on 127.0.0.1:PORT and asks the proxy, through the first
# listener (HTTP CONNECT), for the host's 127.0.0.1:HOSTPORT; the proxy decides and logs
# it like any other destination.
# BW_PROXY_TOKEN, when set (--share-net: the listener is on the host's loopback, open to
# every local user), is the session's proxy password: it goes into the proxy URLs, which
# is where curl, git, pip, npm, Claude Code and Gemini CLI take it from, and is unset.
# COMMAND runs only once every listener listens.  socat says which port it got
# ("listening on AF=2 127.0.0.1:PORT") on stderr, which is read until that line and then
# drained, so socat never blocks on a full pipe; the port comes back through a command
# substitution (no mktemp, FIFO or rm: three programs fewer at every start).
# -b: 256 KiB buffers (8 KiB default halves throughput); -t: wait an hour, not 0.5 s, for
# the reply after a client half-closes.  bwrap --unshare-pid ends socat with the sandbox.
set -eu

if [ "$#" -lt 4 ]; then
    echo "usage: socat_bridge.sh SOCAT SOCKET HOSTPORTS COMMAND [ARG...]" >&2
    exit 2
fi
socat=$1
socket=$2
host_ports=$3
shift 3

# socat gets a session of its own when setsid(1) is there: it handles SIGINT itself and
# would otherwise die of the Ctrl-C meant for the CLI.
detach=
if command -v setsid >/dev/null 2>&1; then
    detach=setsid
fi

# listen LISTEN-ADDRESS TARGET-ADDRESS: start a socat, wait until it listens, set $port.
# No polling and no files: the command substitution ends when the reader has printed the
# port and let go of its output (exec cat >/dev/null), or read to the end of a socat that
# ended first (then $port is empty); socat itself holds only the pipe to the reader.
listen() {
    port=$(
        $detach "$socat" -d -d -b 1048576 -t 3600 "$1" "$2" 2>&1 >/dev/null |
            {
                while IFS= read -r line; do
                    case $line in
                    *" listening on "*)
                        printf '%s\n' "${line##*:}"
                        break
                        ;;
                    *" E "*)
                        printf 'socat_bridge.sh: %s\n' "$line" >&2
                        ;;
                    esac
                done
                exec cat >/dev/null
            } &
    )
    case $port in
    '' | *[!0-9]*)
        echo "socat_bridge.sh: socat could not listen on $1 (got '$port')" >&2
        exit 1
        ;;
    esac
}

listen "TCP4-LISTEN:0,bind=127.0.0.1,reuseaddr,fork" "UNIX-CONNECT:$socket"
bridge=$port
for mapping in $host_ports; do
    case $mapping in
    *[!0-9:]* | :* | *: | *:*:*) mapping= ;;
    esac
    case $mapping in
    *:*) ;;
    *)
        echo "socat_bridge.sh: a host port mapping is not PORT:HOSTPORT" >&2
        exit 2
        ;;
    esac
    listen "TCP4-LISTEN:${mapping%%:*},bind=127.0.0.1,reuseaddr,fork" \
        "PROXY:127.0.0.1:127.0.0.1:${mapping#*:},proxyport=$bridge"
done

credential=
if [ -n "${BW_PROXY_TOKEN:-}" ]; then
    credential="bw:$BW_PROXY_TOKEN@"
fi
unset BW_PROXY_TOKEN
http="http://${credential}127.0.0.1:$bridge"
socks="socks5h://${credential}127.0.0.1:$bridge"
local_names="localhost,127.0.0.1,::1"
export HTTPS_PROXY="$http" HTTP_PROXY="$http" https_proxy="$http" http_proxy="$http"
export ALL_PROXY="$socks" all_proxy="$socks"
export NO_PROXY="$local_names" no_proxy="$local_names"
export NODE_USE_ENV_PROXY=1
exec "$@"
