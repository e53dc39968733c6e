#!/usr/bin/env python3
"""socks_filter.py - a filtering proxy that lets a sandbox reach only allowed destinations.

WHAT IT IS
    A small daemon that listens on a unix domain socket (or TCP, for tests and benchmarks) and
    relays connections to the destinations its allow list names, and nowhere else. bw-claude
    bind-mounts the socket into a sandbox that has no network of its own, so this proxy is the
    sandbox's only way out. One listener speaks three protocols, chosen by the first byte:

        0x05          SOCKS5 (RFC 1928), CONNECT only; no authentication, or with
                      --token-env username/password (RFC 1929)
        0x04          SOCKS4 and SOCKS4a
        ASCII letter  HTTP: "CONNECT host:port" tunnels, and absolute-form "GET http://host/..."

    Claude Code, Gemini CLI, npm and pip speak only HTTP CONNECT (HTTPS_PROXY=http://...);
    curl and git also speak SOCKS (ALL_PROXY=socks5h://...).

USAGE
    socks_filter.py --listen /run/user/1000/bw/proxy.sock --allow api.anthropic.com
    socks_filter.py --listen 127.0.0.1:0 --allow '*.example.com:443' --allow 127.0.0.1:8080 \\
                    --deny ads.example.com --log proxy.jsonl --verbose

    When every listener accepts connections it writes "ready ADDR [ADDR ...]" to --ready-fd (or
    stdout). SIGTERM or SIGINT stops it: it closes every connection, removes its socket file and
    prints a one-line summary to stderr. It also stops when the process that started it dies.

RULES (--allow, --deny, and --allow-file with one rule per line, '#' comments)
    example.com          that name only (any letter case, with or without a trailing dot)
    *.example.com        any name below example.com, but not example.com itself (a name and
                         all below it take two rules: example.com and *.example.com)
    1.2.3.4  10.0.0.0/8  [::1]  [2001:db8::]/32      IP addresses and networks
    *:22                 every host on that port (deny rules only)
    github.com:22/raw    a name rule for any protocol, not only TLS (ssh, plain HTTP through
                         SOCKS, a database); it must name its port.
    Any rule may end in :PORT (example.com:443, [::1]:8080; no leading zeros); without one it
    matches every port. Names may hold '_' (_dmarc.example.com); an IPv6 zone id (fe80::1%eth0)
    is refused. Deny rules win over allow rules and may be as broad as wanted (*:22, *.com,
    [fc00::]/7, 0.0.0.0/0); allow rules too broad to mean anything (*, *.com, a single label,
    *.co.uk, *.github.io, 0.0.0.0/0) are refused at start.
    A deny rule matches an address and also every IPv4 address an IPv6 one may carry to a
    gateway: IPv4-mapped (::ffff:10.0.0.5), NAT64 (64:ff9b::a00:5; in 64:ff9b:1::/48 every
    RFC 6052 layout) and 6to4 (2002:a00:5::1). So --deny 10.0.0.0/8 also refuses
    64:ff9b::a00:5. An allow rule matches the address, its IPv4-mapped form, and the NAT64 form
    64:ff9b::/96 of a public IPv4 address (an exact translation; RFC 6052 forbids translating
    the others), never a 6to4 or 64:ff9b:1::/48 address: 127.0.0.1:8000 does not allow
    64:ff9b::7f00:1 or 2002:7f00:1::, global addresses that are not this host.

HOW A REQUEST IS DECIDED (all of it before any DNS lookup of a denied name)
    1. The requested host is classified. A name with a character outside [A-Za-z0-9_.-], an
       empty label, a label over 63 or a name over 253 bytes, or an IPv6 address with a zone id,
       is denied ("bad-name"). Any spelling of an IP address (127.1, 0x7f.1, 2130706433,
       0177.0.0.1, [::ffff:127.0.0.1]) is that address.
    2. A name passes only by a name rule; an IP address only by an IP rule. Deny rules first.
       A deny rule sees every IPv4 address an IPv6 one carries; an allow rule only the
       IPv4-mapped form and the 64:ff9b::/96 form of a public IPv4 address (see RULES).
    3. An allowed name is resolved once; every address it resolves to is checked and the
       connection goes to one of those checked addresses, never to a second lookup. Each
       address (and a requested IP address), with each IPv4 address it carries, is checked:
       - cloud platform endpoints (PLATFORM_ENDPOINTS: 169.254.169.254, fd00:ec2::254,
         168.63.129.16, 100.100.100.200, 192.0.0.192, ECS/EKS credential agents...) are refused
         ("platform-endpoint") unless an allow rule names exactly that one address (such as
         169.254.169.254:80 or [fd00:ec2::254]; a network that merely contains it, such as
         169.254.0.0/16, does not), even with --allow-private;
       - private-use addresses (10/8, 172.16/12, 192.168/16, fc00::/7) are refused
         ("private-address") unless an IP rule covers them or --allow-private is given;
       - loopback, unspecified, link-local, CGNAT (100.64/10), multicast, broadcast, reserved,
         documentation and benchmarking addresses, IPv6 wrappings of them, and 6to4, Teredo
         and local-use NAT64 addresses (never public), are refused ("private-address") unless
         an IP rule covers them. So are this machine's own interface addresses, read from
         /proc at start (a name pointed at the host's public address reaches its services).
    4. A tunnel (CONNECT, SOCKS) to a name, on any port, must start with a TLS handshake
       record carrying a ClientHello whose server name (SNI) is that name; before that nothing
       reaches the upstream. Anything else closes the tunnel, logged with its reason:
       "sni-mismatch" (another name), "no-sni", "tls-alert-first",
       "tls-change-cipher-spec-first", "tls-heartbeat-first", "tls-data-first", "not-tls",
       "bad-client-hello", "tls-timeout" (no ClientHello within the handshake time). Then the
       proxy reads the server's answer itself until its ServerHello: after a TLS 1.3
       HelloRetryRequest the client's second ClientHello (after at most one change_cipher_spec
       record) is checked the same way, since servers take the name in it too; an answer that
       is not a ServerHello (alerts aside) within the handshake time closes the tunnel
       ("bad-server-hello"). Only then are bytes relayed with splice. A rule
       ending in /raw lets the tunnel carry anything. An IP rule names one address, which has
       no name to compare: it carries whatever that address serves on its ports. Plain http://
       through HTTP (absolute form) is allowed by the name rule for its port; its Host header
       must be the URL's host. Encrypted ClientHello (ECH) hides the real name from any proxy;
       this check cannot see through it.

    --mode audit lets through everything that passes the name and address checks (and is not
    named by a --deny rule) and logs what enforce mode would have decided: run a tool once this
    way to learn which destinations it needs.

LOG (--log FILE: one JSON object per line)
    {"event": "decision", "ts", "id", "proto", "host", "port", "decision", "reason", "mode"}
    {"event": "close", ... "address", "bytes_up", "bytes_down", "duration"}  (allowed ones)
    In audit mode a decision that was not enforced carries "enforced": false; audit mode lets a
    tunnel that is not TLS through (reason "not-tls" and the others above, but not
    "sni-mismatch"). A decision for a tunnel to a name says what it carried: "tunnel": "tls"
    (the ClientHello named the host) or "raw" (a /raw rule, or audit mode); a tunnel refused
    at its second ClientHello has that decision, then a "deny" one. A name refused
    because it resolved to a private address carries that "address".
    Clients refused for a missing or wrong --token-env password are logged with "proxy-auth".
    FILE is appended to only if it is a regular file of ours (never through a link), and no
    shell reading it runs anything: "host" escapes every character outside [A-Za-z0-9.-]
    (an IP address excepted) as \\xNN, other text its $, ` and \\.

LIMITS
    The allow list decides where bytes may go, not what they say: an allowed API is a capability
    (anything can be sent to it, including to an account the sender controls). A client that
    ignores the proxy variables is stopped only by the sandbox having no network of its own.
"""

import collections
import errno
import fcntl
import functools
import ipaddress
import itertools
import os
import re
import stat
import struct
import sys
import time


class Lazy:
    """A standard module imported at its first use (an attribute read): the rule functions
    (bw_lib imports this module for them) need none of these, and importing them all costs
    ~10 ms."""

    def __init__(self, name):
        self._name, self._module = name, None

    def __getattr__(self, attr):
        return getattr(self._load(), attr)

    def _load(self):
        if self._module is None:
            self._module = __import__(self._name)
        return self._module


argparse, base64, binascii, heapq, json, queue, resource, selectors, signal, socket, termios, \
    threading = map(Lazy, ["argparse", "base64", "binascii", "heapq", "json", "queue", "resource",
                           "selectors", "signal", "socket", "termios", "threading"])

HANDSHAKE_TIMEOUT = 10.0      # seconds a client may take to say where it wants to go
CONNECT_TIMEOUT = 10.0        # seconds for the lookup and the upstream connect together
CLOSING_TIMEOUT = 5.0         # seconds to deliver a failure reply before closing anyway
MAX_DRAIN_BYTES = 1 << 20     # what a refused client may still send while it reads the reply
MAX_HEAD_BYTES = 16384        # largest HTTP request head accepted
MAX_CLIENT_HELLO = 65536      # largest TLS ClientHello gathered for the SNI check
RELAY_CHUNK = 262144          # one read while relaying, and the relay pipe's size
DNS_WORKERS = 8
MAX_TRACKED_HOSTS = 1000      # distinct hosts counted for the exit summary
MAX_LOG_BYTES = 64 << 20      # the JSON log stops growing here
DESCRIPTORS_PER_RELAY = 6     # client, upstream and a pipe (two ends) per direction
OVERFLOW_CONNECTIONS = 64     # over the limit, this many more get a proper refusal
ACCEPT_BACKOFF = 0.1          # pause accepting this long when out of file descriptors

DEFAULT_MAX_CONNECTIONS = 1024
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


# ---------------------------------------------------------------------------------------------
# Reasons: every word the log's "reason" field may hold, each with a few words for people (a
# summary of the log shows them) and whether it is fixable: whether an allow rule naming the
# refused destination cures it (for a name that resolved to a private address, a rule naming
# that address). The code uses the names below, never the words themselves.

REASONS = {}        # word -> (text for people, fixable by an allow rule)


def _reason(word, text, fixable=False):
    REASONS[word] = (text, fixable)
    return word


# The policy's decision on a destination (Policy).
ALLOWED_BY_RULE = _reason("allowed-by-rule", "allowed by rule")
NOT_IN_ALLOWLIST = _reason("not-in-allowlist", "not in allow list", fixable=True)
DENIED_BY_RULE = _reason("denied-by-rule", "denied by rule")
PRIVATE_ADDRESS = _reason("private-address", "private address", fixable=True)
PLATFORM_ENDPOINT = _reason("platform-endpoint", "cloud platform endpoint")
IP_LITERAL_NOT_ALLOWED = _reason("ip-literal-not-allowed", "IP address without an IP rule",
                                 fixable=True)
BAD_NAME = _reason("bad-name", "malformed name")
BAD_PORT = _reason("bad-port", "bad port")
# Refused before the destination is looked at.
TOO_MANY_CONNECTIONS = _reason("too-many-connections", "too many connections")
BAD_REQUEST = _reason("bad-request", "malformed request")
PROXY_AUTH = _reason("proxy-auth", "no session credential")
# A tunnel to a name that did not open with a ClientHello naming that host, or whose server
# did not answer with a ServerHello.
SNI_MISMATCH = _reason("sni-mismatch", "TLS name differs from the requested host")
NO_SNI = _reason("no-sni", "TLS without a server name")
NOT_TLS = _reason("not-tls", "not TLS")
BAD_CLIENT_HELLO = _reason("bad-client-hello", "malformed TLS ClientHello")
TLS_TIMEOUT = _reason("tls-timeout", "no TLS ClientHello in time")
TLS_ALERT_FIRST = _reason("tls-alert-first", "TLS alert before the ClientHello")
TLS_CHANGE_CIPHER_SPEC_FIRST = _reason("tls-change-cipher-spec-first",
                                       "TLS change-cipher-spec before the ClientHello")
TLS_HEARTBEAT_FIRST = _reason("tls-heartbeat-first", "TLS heartbeat before the ClientHello")
TLS_DATA_FIRST = _reason("tls-data-first", "TLS application data before the ClientHello")
BAD_SERVER_HELLO = _reason("bad-server-hello", "no valid TLS ServerHello from the server in time")
# Allowed, but the connection did not happen.
LOOKUP_FAILED = _reason("lookup-failed", "DNS lookup failed")
CONNECT_REFUSED = _reason("connect-refused", "connection refused")
UNREACHABLE = _reason("unreachable", "unreachable")
CONNECT_TIMED_OUT = _reason("connect-timeout", "connect timed out")
CONNECT_FAILED = _reason("connect-failed", "connect failed")
# How a connection that was let through ended.
CLOSED = _reason("closed", "closed")
PROXY_STOPPED = _reason("proxy-stopped", "the proxy stopped")
OUT_OF_DESCRIPTORS = _reason("out-of-descriptors", "the proxy ran out of file descriptors")

# Why a tunnel to a name was closed before any byte reached the upstream.
TUNNEL_REFUSALS = frozenset((SNI_MISMATCH, NO_SNI, NOT_TLS, BAD_CLIENT_HELLO, TLS_TIMEOUT,
                             BAD_SERVER_HELLO, TLS_ALERT_FIRST, TLS_CHANGE_CIPHER_SPEC_FIRST,
                             TLS_HEARTBEAT_FIRST, TLS_DATA_FIRST))
# Tunnel refusals that a rule ending in /raw cures (a client that is not TLS, or that waits
# for the server to speak first); the others look like attacks.
RAW_CURES = frozenset((NOT_TLS, TLS_TIMEOUT, NO_SNI))
# Allowed, but never connected: logged allowed, then closed with one of these, counted apart.
FAILURE_REASONS = frozenset((LOOKUP_FAILED, CONNECT_REFUSED, UNREACHABLE, CONNECT_TIMED_OUT,
                             CONNECT_FAILED))

# ---------------------------------------------------------------------------------------------
# Names and addresses

class BadName(ValueError):
    """A requested host that is not a plausible DNS name or IP address."""


class RuleError(ValueError):
    """An allow or deny rule that cannot be used."""


NAME_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
NUMERIC_LABEL_RE = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z")

# Networks no sandboxed tool has a reason to reach unless an IP rule names them, each with the
# word messages use for it (the first network that holds an address names it).
SPECIAL_NETWORKS = tuple((ipaddress.ip_network(n), kind) for n, kind in (
    ("0.0.0.0/8", "unspecified"), ("10.0.0.0/8", "private-use"), ("100.64.0.0/10", "CGNAT"),
    ("127.0.0.0/8", "loopback"), ("169.254.0.0/16", "link-local"), ("172.16.0.0/12", "private-use"),
    ("192.0.0.0/24", "IETF protocol"), ("192.0.2.0/24", "documentation"),
    ("192.88.99.0/24", "6to4 relay"), ("192.168.0.0/16", "private-use"),
    ("198.18.0.0/15", "benchmarking"), ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"), ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"), ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"), ("::1/128", "loopback"), ("::/96", "IPv4-compatible"),
    ("64:ff9b:1::/48", "local-use NAT64"), ("100::/64", "discard"), ("2001::/32", "Teredo"),
    ("2001:db8::/32", "documentation"), ("2002::/16", "6to4"),
    ("::ffff:0:0:0/96", "IPv4-translated"),
    ("fc00::/7", "private-use"), ("fe80::/10", "link-local"), ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
))
BLOCKED_NETWORKS = tuple(network for network, _ in SPECIAL_NETWORKS)
# What --allow-private opens to allowed names: RFC 1918 and RFC 4193, nothing else.
PRIVATE_USE_NETWORKS = tuple(network for network, kind in SPECIAL_NETWORKS if kind == "private-use")
NAT64_NETWORK = ipaddress.ip_network("64:ff9b::/96")
LOCAL_NAT64_NETWORK = ipaddress.ip_network("64:ff9b:1::/48")
SIXTOFOUR_NETWORK = ipaddress.ip_network("2002::/16")

# Cloud platform endpoints (metadata, credentials, host agents): what a VM or container on that
# cloud reaches without any credential, some on public or private-use addresses. Refused, also
# inside IPv6 wrappings, unless an IP rule for that one address allows it (Policy.check_address).
# Sources: AWS docs (EC2 "Retrieve instance metadata", ECS "task metadata endpoint v2", EKS
# "Set up the Pod Identity Agent"), Microsoft's "What is IP address 168.63.129.16?", cloud-init
# and Alibaba ECI docs (100.100.100.200), OCI "Getting Instance Metadata", the OpenStack neutron
# spec "IPv6 support in Metadata service"; 192.0.0.192, fd20:ce::254 and fd00:c1::a9fe:a9fe
# only from other projects' blocklists (no first-party page found).
PLATFORM_ENDPOINTS = {ipaddress.ip_address(address): what for address, what in (
    ("169.254.169.254", "instance metadata of AWS, Azure, GCP, Oracle, OpenStack..."),
    ("fd00:ec2::254", "AWS instance metadata"),
    ("169.254.170.2", "AWS ECS task metadata and credentials"),
    ("169.254.170.23", "AWS EKS Pod Identity credentials"),
    ("fd00:ec2::23", "AWS EKS Pod Identity credentials"),
    ("168.63.129.16", "Azure WireServer"),
    ("100.100.100.200", "Alibaba Cloud instance metadata"),
    ("192.0.0.192", "Oracle Cloud instance metadata (legacy)"),
    ("fd20:ce::254", "GCP instance metadata"),
    ("fd00:c1::a9fe:a9fe", "Oracle Cloud instance metadata"),
    ("fe80::a9fe:a9fe", "OpenStack instance metadata"),
)}

# Suffixes under which anyone can get a name of their own: a wildcard over one allows strangers.
SHARED_SUFFIXES = frozenset((
    "co.uk", "org.uk", "ac.uk", "gov.uk", "me.uk", "com.au", "net.au", "org.au", "co.jp",
    "co.nz", "co.in", "co.kr", "co.za", "com.br", "com.cn", "com.mx", "com.tr",
    "github.io", "gitlab.io", "herokuapp.com", "appspot.com", "blogspot.com", "cloudfront.net",
    "amazonaws.com", "azurewebsites.net", "vercel.app", "netlify.app", "pages.dev",
    "workers.dev", "web.app", "firebaseapp.com", "ngrok.io", "ngrok-free.app",
    "trycloudflare.com", "googleusercontent.com", "repl.co", "glitch.me", "s3.amazonaws.com",
    "r2.dev", "fly.dev", "onrender.com", "railway.app", "duckdns.org", "azureedge.net",
    "blob.core.windows.net", "storage.googleapis.com", "deno.dev", "surge.sh", "gitbook.io",
    "readthedocs.io", "pythonanywhere.com", "000webhostapp.com", "ngrok.app", "loca.lt",
))


def _parse_ipv4_part(text):
    """One part of an inet_aton() spelling: decimal, 0x hex or 0-prefixed octal."""
    if text[:2] in ("0x", "0X"):
        return int(text[2:], 16) if text[2:] else None
    if len(text) > 1 and text[0] == "0":
        return int(text, 8) if all(c in "01234567" for c in text) else None
    return int(text)


def parse_ip_spelling(text):
    """Return the IP address that `text` reaches through getaddrinfo()/inet_aton(), or None.

    Covers dotted quads and the forms libc also accepts (127.1, 0x7f.1, 2130706433, 0177.0.0.1),
    IPv6 with or without brackets, and returns IPv4-mapped IPv6 as the IPv4 address it is.
    An IPv6 zone id (fe80::1%eth0) is not an address here: it would pick the interface.
    """
    if "%" in text:
        return None
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if ":" not in text:
            return None
    if ":" in text:
        try:
            address = ipaddress.IPv6Address(text)
        except ValueError:
            return None
        return address.ipv4_mapped or address
    if text.endswith("."):
        text = text[:-1]
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(NUMERIC_LABEL_RE.match(p) for p in parts):
        return None
    values = [_parse_ipv4_part(p) for p in parts]
    if None in values:
        return None
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for shift, value in enumerate(reversed(head), start=4 - len(head)):
        number |= value << (8 * shift)
    return ipaddress.IPv4Address(number)


def canonical_name(text):
    """Return `text` as a canonical DNS name (lowercase, no trailing dot) or raise BadName."""
    if not text:
        raise BadName("empty name")
    name = text[:-1] if text.endswith(".") else text
    if not NAME_RE.match(name):
        raise BadName("characters outside [A-Za-z0-9_.-]")
    if len(name) > 253:
        raise BadName("longer than 253 bytes")
    labels = name.split(".")
    if "" in labels:
        raise BadName("empty label")
    if any(len(label) > 63 for label in labels):
        raise BadName("label longer than 63 bytes")
    if any(label.startswith("-") or label.endswith("-") for label in labels):
        raise BadName("a label starts or ends with '-'")   # not a host name (RFC 1123)
    if NUMERIC_LABEL_RE.match(labels[-1]):
        raise BadName("numeric, but not a valid IP address")
    return name.lower()


@functools.lru_cache(maxsize=4096)
def classify_host(text):
    """Return ("ip", address) or ("name", canonical name) for a requested host; raise BadName."""
    if "%" in text and ":" in text:
        raise BadName("an IPv6 address with a zone id")
    address = parse_ip_spelling(text)
    if address is not None:
        return "ip", address
    return "name", canonical_name(text)


def embedded_ipv4(address):
    """The IPv4 addresses an IPv6 address may carry to a gateway that translates it: IPv4-mapped,
    NAT64 (64:ff9b::/96 and, in each RFC 6052 layout its operator may pick, 64:ff9b:1::/48) and
    6to4. Deny rules and address checks look at these too (allow rules only at
    translated_ipv4). Teredo and IPv4-compatible addresses are blocked whole, and
    IPv4-translated ones are not decoded."""
    if address.version != 6:
        return []
    if address.ipv4_mapped:
        return [address.ipv4_mapped]
    if address in NAT64_NETWORK:
        return [ipaddress.IPv4Address(address.packed[12:])]
    if address in SIXTOFOUR_NETWORK:
        return [address.sixtofour]
    if address in LOCAL_NAT64_NETWORK:
        b = address.packed      # prefix /48, /56, /64, /96; byte 8 is RFC 6052's "u" octet
        readings = (b[6:8] + b[9:11], b[7:8] + b[9:12], b[9:13], b[12:16])
        return list(dict.fromkeys(ipaddress.IPv4Address(r) for r in readings))
    return []


def translated_ipv4(address):
    """The IPv4 address an IPv6 address stands for exactly, or None: the IPv4-mapped form, and
    a well-known-prefix NAT64 address (64:ff9b::/96) of a public IPv4 address (RFC 6052
    section 3.1 forbids translating the others). A 6to4 address is a host behind a relay,
    and a local-use NAT64 address has no fixed layout: neither stands for the IPv4 address
    in it, which is what an allow rule for that address may reach."""
    if address.version != 6:
        return None
    if address.ipv4_mapped:
        return address.ipv4_mapped
    if address in NAT64_NETWORK:
        inner = ipaddress.IPv4Address(address.packed[12:])
        return inner if is_public_address(inner) else None
    return None


def _within(address, networks):
    return any(address in network for network in networks if network.version == address.version)


def is_platform_endpoint(address):
    """A cloud platform endpoint (PLATFORM_ENDPOINTS), itself or carried inside IPv6."""
    return any(a in PLATFORM_ENDPOINTS for a in [address, *embedded_ipv4(address)])


def is_public_address(address):
    """True only for a globally routable unicast address that is not a platform endpoint,
    looking inside IPv6 wrappings."""
    if address in PLATFORM_ENDPOINTS or _within(address, BLOCKED_NETWORKS):
        return False
    if not address.is_global or address.is_multicast:
        return False
    return all(is_public_address(inner) for inner in embedded_ipv4(address))


def address_class(address):
    """Which rule or option may reach an address: "platform" (an exact IP rule), "public" (a
    name rule), "private-use" (an IP rule, or a name rule with --allow-private) or "special"
    (loopback, link-local, CGNAT, multicast, reserved...: an IP rule). A wrapping is private-use
    when every IPv4 address it may carry is."""
    if is_platform_endpoint(address):
        return "platform"
    if is_public_address(address):
        return "public"
    inner = embedded_ipv4(address)
    if _within(address, PRIVATE_USE_NETWORKS) or (
            inner and all(_within(a, PRIVATE_USE_NETWORKS) for a in inner)):
        return "private-use"
    return "special"


def describe_address(address):
    """What a non-public address is, in a word or two, for messages: "loopback", "CGNAT",
    "NAT64 form of link-local"..."""
    inner = embedded_ipv4(address)
    if len(inner) == 1 and not address.ipv4_mapped and not is_public_address(inner[0]):
        wrapping = "6to4" if address in SIXTOFOUR_NETWORK else "NAT64"
        return f"{wrapping} form of {describe_address(inner[0])}"
    if address in PLATFORM_ENDPOINTS:
        return f"cloud platform endpoint ({PLATFORM_ENDPOINTS[address]})"
    return next((kind for network, kind in SPECIAL_NETWORKS
                 if network.version == address.version and address in network), "non-public")


def display_host(text):
    """The host as logs and messages show it: canonical when it parses, else escaped so that a
    hostile name cannot put control characters into a terminal or a log reader."""
    try:
        kind, value = classify_host(text)
    except BadName:
        return "".join(c if "!" <= c <= "~" else f"\\x{ord(c):02x}" for c in text[:255])
    return str(value)


def log_name(text):
    """A host name as the log writes it: an IP address as such, a name with everything
    outside [A-Za-z0-9.-] escaped (\\xNN), so that no shell reading the log would run any of
    it (a log may be turned into a link to ~/.bashrc by a sandbox that could write it)."""
    if parse_ip_spelling(text):
        return text
    return "".join(c if c.isascii() and (c.isalnum() or c in ".-") else
                   "".join(f"\\x{b:02x}" for b in c.encode("utf-8", "surrogateescape"))
                   for c in text)


def shell_inert(record):
    """A log record with its names escaped (log_name) and no `$` or backquote in any other
    text: inside JSON's double quotes those are all a shell would expand."""
    safe = {}
    for key, value in record.items():
        if isinstance(value, str) and key == "host":
            value = log_name(value)
        elif isinstance(value, str):
            value = value.replace("\\", "\\x5c").replace("$", "\\x24").replace("`", "\\x60")
        safe[key] = value
    return safe


def open_log(path):
    """The log, opened to append without following a link, and refused unless it is a
    regular file of ours: it may sit where the sandbox can write."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                 | os.O_CLOEXEC, 0o600)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(f"{path} is not a regular file of yours")
    os.set_blocking(fd, True)
    return open(fd, "a", buffering=1, encoding="utf-8")


def host_port(host, port):
    """host:port, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host and parse_ip_spelling(host) else f"{host}:{port}"


def format_address(address, port):
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


# ---------------------------------------------------------------------------------------------
# Rules and policy

class Rule:
    """One allow or deny rule: a name, a wildcard below a name, an IP network, or (deny only) any
    host; maybe a port."""

    raw = False                 # a name rule ending in /raw: any protocol, not only TLS

    def __init__(self, text, kind, value, port, deny=False):
        self.text, self.kind, self.value, self.port, self.deny = text, kind, value, port, deny

    def matches_name(self, name, port):
        if self.port is not None and self.port != port:
            return False
        if self.kind == "any":
            return True
        if self.kind == "name":
            return name == self.value
        if self.kind == "wildcard":
            return name.endswith("." + self.value)
        return False

    def matches_address(self, address, port):
        """An IP rule matches the address itself. A deny rule also matches any IPv4 address it
        may carry (embedded_ipv4), so that no wrapping escapes it; an allow rule only the one
        that reaches the same host (translated_ipv4), so that it never opens a global
        6to4 or NAT64 destination that merely embeds its address."""
        if self.port is not None and self.port != port:
            return False
        if self.kind == "any":
            return True
        if self.kind != "ip":
            return False
        if self._covers(address):
            return True
        if self.deny:
            return any(self._covers(a) for a in embedded_ipv4(address))
        inner = translated_ipv4(address)
        return inner is not None and self._covers(inner)

    def _covers(self, address):
        return address.version == self.value.version and address in self.value

    def names_exactly(self):
        """A rule for one address: what a platform endpoint needs (a network that merely
        contains one, like 169.254.0.0/16, does not let it through)."""
        return self.kind == "ip" and self.value.num_addresses == 1

    def __repr__(self):
        return f"Rule({self.text!r})"


def _parse_port(text, rule):
    if not text.isdigit() or text.startswith("0") or int(text) > 65535:
        raise RuleError(f"rule {rule!r}: port must be 1 to 65535, without leading zeros")
    return int(text)


def _parse_network(text, rule, deny):
    if "%" in text:
        raise RuleError(f"rule {rule!r}: an IPv6 zone id (%...) is not accepted")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as error:
        raise RuleError(f"rule {rule!r}: not a valid IP address or network ({error})") from None
    if network.version == 6 and network.network_address.ipv4_mapped and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        network = ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    if not deny and network.prefixlen < (8 if network.version == 4 else 16):
        raise RuleError(f"rule {rule!r}: network is too broad (shorter than /8 for IPv4, /16 for IPv6)")
    return network


def parse_rule(text, deny=False):
    """Parse one rule (see the module docstring) into a Rule, or raise RuleError saying why.
    Breadth is refused only in allow rules: a broad deny rule (*:22, 0.0.0.0/0, *.com) only
    takes more away."""
    rule = text.strip()
    if rule.endswith(RAW_SUFFIX):
        return parse_raw_rule(rule, deny)
    if not rule:
        raise RuleError("empty rule")
    if not rule.isascii():
        raise RuleError(f"rule {rule!r}: write internationalised names in punycode (xn--...)")
    port = None
    if rule == "*" or rule.startswith("*:"):
        if not deny:
            raise RuleError(f"rule {rule!r}: too broad (every host); only a deny rule may be")
        return Rule(rule, "any", None, _parse_port(rule[2:], rule) if rule != "*" else None, deny)
    if rule.startswith("["):
        close = rule.find("]")
        if close < 0:
            raise RuleError(f"rule {rule!r}: missing ']'")
        host, rest = rule[1:close], rule[close + 1:]
        prefix = ""
        if rest.startswith("/"):
            prefix, _, rest = rest.partition(":")
            rest = ":" + rest if _ else ""
        if rest:
            if not rest.startswith(":"):
                raise RuleError(f"rule {rule!r}: unexpected text after ']'")
            port = _parse_port(rest[1:], rule)
        return Rule(rule, "ip", _parse_network(host + prefix, rule, deny), port, deny)
    if rule.count(":") > 1:
        raise RuleError(f"rule {rule!r}: write IPv6 addresses in brackets, e.g. [::1] or [::1]:443")
    host, colon, port_text = rule.partition(":")
    if colon:
        port = _parse_port(port_text, rule)
    if "/" in host or all(NUMERIC_LABEL_RE.match(label) for label in host.rstrip(".").split(".")):
        return Rule(rule, "ip", _parse_network(host, rule, deny), port, deny)
    if host.startswith("**."):
        raise RuleError(f"rule {rule!r}: write a name and all names below it as two rules, "
                        f"{host[3:]} and *.{host[3:]}")
    kind = "name"
    if host.startswith("*."):
        kind, host = "wildcard", host[2:]
    if "*" in host:
        raise RuleError(f"rule {rule!r}: '*' is allowed only as a leading '*.' label")
    try:
        name = canonical_name(host)
    except BadName as error:
        raise RuleError(f"rule {rule!r}: not a valid name ({error})") from None
    if not deny and name.count(".") == 0:
        raise RuleError(f"rule {rule!r}: too broad or not a full name (a single label)")
    if not deny and kind == "wildcard" and name in SHARED_SUFFIXES:
        raise RuleError(f"rule {rule!r}: too broad ({name} is a suffix anyone can register under)")
    return Rule(rule, kind, name, port, deny)


def read_rule_file(path):
    """Rules from a file: one per line, '#' starts a comment. Errors name the file and line."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise RuleError(f"cannot read rule file {path}: {error}") from None
    rules = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if text:
            try:
                rules.append(parse_rule(text))
            except RuleError as error:
                raise RuleError(f"{path}:{number}: {error}") from None
    return rules


class Verdict:
    """The answer to "may this go through?": allowed, a reason word, and a detail for people.

    enforced is False when audit mode lets through what enforce mode would deny.
    """

    def __init__(self, allowed, reason, detail="", enforced=True):
        self.allowed, self.reason, self.detail, self.enforced = allowed, reason, detail, enforced

    @property
    def decision(self):
        """What enforce mode decides (the log's "decision" field)."""
        return "allow" if self.allowed and self.enforced else "deny"

    def __repr__(self):
        return f"Verdict({self.decision}, {self.reason!r}, enforced={self.enforced})"


class Policy:
    """The allow and deny rules and the address checks; pure, no sockets."""

    def __init__(self, allow=(), deny=(), allow_private=False, mode="enforce", own=frozenset()):
        if mode not in ("enforce", "audit"):
            raise ValueError(f"unknown mode {mode!r}")
        self.allow, self.deny = list(allow), list(deny)
        self.allow_private, self.mode, self.own = allow_private, mode, own

    def _unlisted(self, reason, detail):
        if self.mode == "audit":
            return Verdict(True, reason, detail, enforced=False)
        return Verdict(False, reason, detail)

    def check_request(self, host, port):
        """Decide on a requested host (name or IP spelling) and port, before any lookup."""
        if not isinstance(port, int) or not 1 <= port <= 65535:
            return Verdict(False, BAD_PORT, f"port {port!r} is not 1-65535")
        try:
            kind, value = classify_host(host)
        except BadName as error:
            return Verdict(False, BAD_NAME, str(error))
        if kind == "ip":
            return self.check_address(value, port, literal=True)
        if any(rule.matches_name(value, port) for rule in self.deny):
            return Verdict(False, DENIED_BY_RULE, f"{value} matches a deny rule")
        for rule in self.allow:
            if rule.matches_name(value, port):
                return Verdict(True, ALLOWED_BY_RULE, f"rule {rule.text}")
        return self._unlisted(NOT_IN_ALLOWLIST, f"no allow rule matches {value}:{port}")

    def _classify(self, address):
        """address_class() and words for messages; this machine's own addresses (self.own)
        count as loopback."""
        kind = address_class(address)
        own = not self.own.isdisjoint([address, *embedded_ipv4(address)])
        if own and kind in ("public", "private-use"):
            return "special", "this machine's own address"
        return kind, describe_address(address)

    def check_address(self, address, port, literal=False):
        """Decide on an IP address: one that was asked for (literal) or that a name resolved to.
        Deny rules first; then a platform endpoint needs an allow rule for exactly that address,
        any other non-public address an IP rule (private-use ones also --allow-private)."""
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        shown = format_address(address, port)
        if any(rule.matches_address(address, port) for rule in self.deny):
            return Verdict(False, DENIED_BY_RULE, f"{shown} matches a deny rule")
        allowing = [rule for rule in self.allow if rule.matches_address(address, port)]
        kind, what = self._classify(address)
        if kind == "platform" and not any(rule.names_exactly() for rule in allowing):
            return Verdict(False, PLATFORM_ENDPOINT,
                           f"{shown}: {what}; only an allow rule for exactly this address "
                           "reaches it")
        if allowing:
            return Verdict(True, ALLOWED_BY_RULE, f"rule {allowing[0].text}")
        if kind == "special" or (kind == "private-use" and not self.allow_private):
            how = "an IP rule or --allow-private" if kind == "private-use" else "only an IP rule"
            return Verdict(False, PRIVATE_ADDRESS,
                           f"{shown} is not public ({what}; {how} reaches it)")
        if literal:
            return self._unlisted(IP_LITERAL_NOT_ALLOWED, f"no IP rule covers {shown}")
        return Verdict(True, ALLOWED_BY_RULE, f"resolved to {shown}")

    def check_resolved(self, name, addresses, port):
        """Decide on the addresses an allowed name resolved to: (a denial naming the first one
        refused, that address when a rule naming it is the fix), or (None, None) for none."""
        for address in addresses:
            verdict = self.check_address(address, port)
            if not verdict.allowed:
                return (Verdict(False, verdict.reason, f"{name} resolves to {verdict.detail}"),
                        address if verdict.reason == PRIVATE_ADDRESS else None)
        return None, None


# ---------------------------------------------------------------------------------------------
# What a tunnel may carry
#
# A name rule is a rule for that name's TLS service: a tunnel to it (CONNECT, SOCKS) must open
# with a TLS ClientHello naming that very host, on every port, since shared CDNs route by SNI
# or Host on many ports. Anything else needs a rule ending in /raw, which must name its port.
# An IP rule names one address (nothing to compare a server name with) and carries whatever
# that address serves on the rule's ports.

RAW_SUFFIX = "/raw"
# The log reason for each TLS record type that is not a handshake, sent first. Some TLS servers
# accept these before the ClientHello and then answer a hello for another site.
TLS_RECORD_FIRST = {0x14: TLS_CHANGE_CIPHER_SPEC_FIRST, 0x15: TLS_ALERT_FIRST,
                    0x17: TLS_DATA_FIRST, 0x18: TLS_HEARTBEAT_FIRST}


def parse_raw_rule(text, deny=False):
    """'host:port/raw': the rule before the suffix, marked raw. A port is required: a raw rule
    for every port of a shared host would reach every site that host serves in the clear."""
    rule = parse_rule(text[:-len(RAW_SUFFIX)], deny)
    if rule.port is None or rule.raw:
        raise RuleError(f"rule {text!r}: a {RAW_SUFFIX} rule names one port, e.g. github.com:22/raw")
    rule.text, rule.raw = text, True
    return rule


def allows_raw(policy, name, port):
    """Whether an allow rule for this name and port ends in /raw."""
    return any(rule.raw and rule.matches_name(name, port) for rule in policy.allow)


def tunnel_start(data):
    """Classify the first bytes a client sent into a tunnel: None (need more), ("sni", name)
    for a ClientHello naming a server, else (reason, detail) with a TUNNEL_REFUSALS reason."""
    if not data:
        return None
    if data[0] in TLS_RECORD_FIRST:
        return TLS_RECORD_FIRST[data[0]], f"TLS record type {data[0]} before the ClientHello"
    if data[0] != 0x16:
        return NOT_TLS, "the stream does not start with a TLS handshake"
    try:
        found = parse_client_hello(data)
    except ProtocolError as error:
        return BAD_CLIENT_HELLO, f"bad ClientHello: {error}"
    if found is None:
        if len(data) > MAX_CLIENT_HELLO + 1024:
            return BAD_CLIENT_HELLO, "ClientHello too large"
        return None
    if found[0] == NO_SNI:
        return NO_SNI, "a ClientHello without a server name"
    return found


# ---------------------------------------------------------------------------------------------
# A TLS 1.3 HelloRetryRequest
#
# A server that takes none of the key shares a ClientHello offers answers with a
# HelloRetryRequest (a ServerHello with a fixed random), and the client sends a second
# ClientHello on the same connection; servers read the name in that one too (OpenSSL's
# servername callback runs again, and a front end may route by it). So once the checked hello
# is relayed the proxy reads the server's answer itself until its first handshake message shows
# what it is; after a HelloRetryRequest the client's next hello must name the same host.

# SHA-256("HelloRetryRequest"), the random of every HelloRetryRequest (RFC 8446 section 4.1.3).
HELLO_RETRY_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
MAX_SERVER_HELLO_SCAN = 65536     # a server's bytes read before its ServerHello must show
MAX_TLS_RECORD = 16384 + 2048     # the largest TLS record (RFC 8446 section 5.2)


def server_hello_kind(data):
    """Classify what a server sent back after a ClientHello: None (need more), "hello-retry"
    (a HelloRetryRequest: a second ClientHello follows) or "server-hello" (any other ServerHello:
    the handshake goes on encrypted, or as TLS 1.2). Alert records before it are skipped (a
    warning may come first; a fatal one ends the connection); anything else raises
    ProtocolError."""
    handshake, offset = bytearray(), 0
    while len(handshake) < 4 + 2 + 32:          # type, length, legacy_version, random
        if offset > MAX_SERVER_HELLO_SCAN:
            raise ProtocolError("no ServerHello in the server's first bytes")
        if len(data) < offset + 5:
            return None
        kind, length = data[offset], struct.unpack("!H", data[offset + 3:offset + 5])[0]
        if kind not in (0x15, 0x16) or data[offset + 1] != 3 or length > MAX_TLS_RECORD:
            raise ProtocolError(f"the server sent TLS record type {kind} before its ServerHello"
                                if data[offset + 1] == 3 else "the server does not answer in TLS")
        if len(data) < offset + 5 + length:
            return None
        if kind == 0x16:
            handshake += data[offset + 5:offset + 5 + length]
        offset += 5 + length
        if handshake and handshake[0] != 2:
            raise ProtocolError("the server's first handshake message is not a ServerHello")
    return "hello-retry" if handshake[6:38] == HELLO_RETRY_RANDOM else "server-hello"


def retry_hello_start(data):
    """tunnel_start() for what a client sends after a HelloRetryRequest: its second ClientHello,
    after at most one middlebox-compatibility change_cipher_spec record (RFC 8446 D.4)."""
    if data[:1] == b"\x14":
        if len(data) < 6:
            return None
        if data[1] != 3 or data[3:6] != b"\x00\x01\x01":
            return BAD_CLIENT_HELLO, "a malformed change_cipher_spec record"
        data = data[6:]
    return tunnel_start(data)


def client_hello_end(data):
    """Where the records of the first ClientHello in `data` (all of them received) end. A hello
    sharing its last record with more handshake bytes raises ProtocolError: after a
    HelloRetryRequest those would be a second hello the proxy never looked at."""
    handshake, offset = bytearray(), 0
    while len(handshake) < 4 or len(handshake) < 4 + int.from_bytes(handshake[1:4], "big"):
        length = struct.unpack("!H", data[offset + 3:offset + 5])[0]
        handshake += data[offset + 5:offset + 5 + length]
        offset += 5 + length
    if len(handshake) != 4 + int.from_bytes(handshake[1:4], "big"):
        raise ProtocolError("more handshake bytes in the ClientHello's last record")
    return offset


# ---------------------------------------------------------------------------------------------
# Proxy credentials
#
# A proxy reached through a TCP port on the host's loopback (bw-claude's --share-net mode) is
# reachable by every local user; with --token-env the proxy serves only clients that send the
# session's secret as the password of the proxy URL (any user name): HTTP Proxy-Authorization
# Basic, SOCKS5 username/password (RFC 1929). SOCKS4 carries no password and is refused. The
# secret comes in an environment variable, never on the command line, where `ps` would show it.

def parse_socks5_userpass(data):
    """Return (password bytes, bytes used) from an RFC 1929 sub-negotiation."""
    if len(data) < 2:
        return None
    if data[0] != 1:
        raise ProtocolError("malformed SOCKS5 username/password request")
    at = 2 + data[1]
    if len(data) < at + 1 or len(data) < at + 1 + data[at]:
        return None
    return bytes(data[at + 1:at + 1 + data[at]]), at + 1 + data[at]


def http_proxy_password(head):
    """The password of a Basic Proxy-Authorization header in an HTTP request head, or None."""
    split = split_http_head(head)
    values = [value for name, value in (split[1] if split else ())
              if name.lower() == "proxy-authorization"]
    if len(values) != 1:
        return None
    scheme, _, encoded = values[0].partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (ValueError, binascii.Error):
        return None
    return decoded.partition(b":")[2]


def password_matches(token, password):
    """Whether `password` is the session's `token`; always true without one."""
    if token is None:
        return True
    # Imported here, not at the top: it loads OpenSSL (~3 ms of every proxy start), and only
    # --token-env needs it.
    import hmac
    return password is not None and hmac.compare_digest(password, token)


def proxy_auth_reply():
    """407 with a Basic challenge: clients such as git send the credential only when asked."""
    body = b"socks_filter: this proxy needs the session's credential.\n"
    return (b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b"Proxy-Authenticate: Basic realm=\"socks_filter\"\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n"
            b"X-Proxy-Error: " + PROXY_AUTH.encode() + b"\r\n\r\n" + body)


# ---------------------------------------------------------------------------------------------
# Protocol parsing: pure functions over the bytes received so far. Each returns None when more
# bytes are needed, or raises ProtocolError for bytes that can never become a valid request.

# SOCKS5 replies (RFC 1928 section 6) and methods (section 3), the RFC 1929 status, and the
# SOCKS4 reply codes ("CD" in the SOCKS4 protocol description).
SOCKS5_SUCCEEDED = 0x00
SOCKS5_GENERAL_FAILURE = 0x01
SOCKS5_NOT_ALLOWED = 0x02               # "connection not allowed by ruleset"
SOCKS5_NETWORK_UNREACHABLE = 0x03
SOCKS5_HOST_UNREACHABLE = 0x04
SOCKS5_CONNECTION_REFUSED = 0x05
SOCKS5_COMMAND_NOT_SUPPORTED = 0x07
SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED = 0x08
SOCKS5_NO_AUTHENTICATION = 0x00         # methods a greeting offers and the reply picks
SOCKS5_USERNAME_PASSWORD = 0x02
SOCKS5_NO_ACCEPTABLE_METHODS = b"\x05\xff"    # the greeting's refusal, version and method
USERPASS_SUCCESS = b"\x01\x00"                # RFC 1929 version 1, status 0
USERPASS_FAILURE = b"\x01\x01"                # RFC 1929 version 1, any other status
SOCKS4_GRANTED = 0x5A
SOCKS4_REJECTED = 0x5B


class ProtocolError(Exception):
    """A malformed or unsupported request; carries the reply code each protocol should send."""

    def __init__(self, message, socks5=SOCKS5_GENERAL_FAILURE, http=400):
        super().__init__(message)
        self.socks5, self.http = socks5, http


class Request:
    """Where a client asked to go, in whatever protocol it asked."""

    def __init__(self, proto, host, port, head=b"", body_length=0):
        self.proto, self.host, self.port = proto, host, port
        self.head, self.body_length = head, body_length


def parse_socks5_greeting(data):
    """Return (offered methods, bytes used)."""
    if len(data) < 2:
        return None
    if data[1] == 0:
        raise ProtocolError("SOCKS5 greeting offers no methods")
    end = 2 + data[1]
    return (bytes(data[2:end]), end) if len(data) >= end else None


def parse_socks5_request(data):
    """Return (Request, bytes used) for a SOCKS5 CONNECT request."""
    if len(data) < 5:
        return None
    version, command, reserved, address_type = data[0], data[1], data[2], data[3]
    if version != 5 or reserved != 0:
        raise ProtocolError("malformed SOCKS5 request")
    if command != 1:
        raise ProtocolError(f"SOCKS5 command {command} is not supported",
                            socks5=SOCKS5_COMMAND_NOT_SUPPORTED)
    if address_type == 1:
        end = 4 + 4 + 2
        host = lambda: str(ipaddress.IPv4Address(bytes(data[4:8])))
    elif address_type == 4:
        end = 4 + 16 + 2
        host = lambda: str(ipaddress.IPv6Address(bytes(data[4:20])))
    elif address_type == 3:
        end = 5 + data[4] + 2
        host = lambda: bytes(data[5:5 + data[4]]).decode("latin-1")
    else:
        raise ProtocolError(f"SOCKS5 address type {address_type} is not supported",
                            socks5=SOCKS5_ADDRESS_TYPE_NOT_SUPPORTED)
    if len(data) < end:
        return None
    port = struct.unpack("!H", data[end - 2:end])[0]
    return Request("socks5", host(), port), end


def _read_cstring(data, start, limit=256):
    """Index of the NUL ending a string at `start`, or None when not yet received."""
    end = data.find(b"\0", start, start + limit)
    if end < 0:
        if len(data) - start >= limit:
            raise ProtocolError("SOCKS4 string too long")
        return None
    return end


def parse_socks4_request(data):
    """Return (Request, bytes used) for SOCKS4 or SOCKS4a CONNECT."""
    if len(data) < 8:
        return None
    if data[1] != 1:
        raise ProtocolError(f"SOCKS4 command {data[1]} is not supported")
    port = struct.unpack("!H", data[2:4])[0]
    user_end = _read_cstring(data, 8)
    if user_end is None:
        return None
    if data[4:7] == b"\0\0\0" and data[7] != 0:
        name_end = _read_cstring(data, user_end + 1)
        if name_end is None:
            return None
        return Request("socks4a", bytes(data[user_end + 1:name_end]).decode("latin-1"), port), name_end + 1
    return Request("socks4a", str(ipaddress.IPv4Address(bytes(data[4:8]))), port), user_end + 1


BARE_LF_RE = re.compile(rb"(?<!\r)\n")
TOKEN_RE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
FIELD_VALUE_RE = re.compile(rb"[\t\x20-\x7e]*\Z")
AUTHORITY_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::([0-9]{1,5}))?\Z")
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate",
    "te", "trailer", "transfer-encoding", "upgrade",
))


def parse_authority(text, default_port=None):
    """Split "host:port" or "[v6]:port" strictly; return (host, port)."""
    match = AUTHORITY_RE.match(text)
    if not match:
        raise ProtocolError(f"malformed host {text[:100]!r}")
    host, port = match.group(1), match.group(2)
    if port is None:
        if default_port is None:
            raise ProtocolError(f"missing port in {text[:100]!r}")
        return host, default_port
    if not 1 <= int(port) <= 65535:
        raise ProtocolError(f"port out of range in {text[:100]!r}")
    return host, int(port)


def _same_host(a, b):
    """Compare two host spellings the way the policy sees them."""
    try:
        return classify_host(a) == classify_host(b)
    except BadName:
        return False


def split_http_head(data):
    """Return (request line, [(name, value)], bytes used) for a complete, strictly formed head."""
    end = data.find(b"\r\n\r\n")
    if BARE_LF_RE.search(data, 0, end + 2 if end >= 0 else len(data)):
        raise ProtocolError("bare LF in request head")
    if end < 0:
        if len(data) > MAX_HEAD_BYTES:
            raise ProtocolError("request head too large", http=431)
        return None
    if end + 4 > MAX_HEAD_BYTES:
        raise ProtocolError("request head too large", http=431)
    lines = bytes(data[:end]).split(b"\r\n")
    if any(b"\r" in line or b"\n" in line or b"\0" in line for line in lines):
        raise ProtocolError("bare CR, LF or NUL in request head")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN_RE.match(name) or not FIELD_VALUE_RE.match(value):
            raise ProtocolError("malformed header line")
        headers.append((name.decode("ascii"), value.strip(b" \t").decode("ascii")))
    return lines[0], headers, end + 4


def parse_http_request(data):
    """Return (Request, bytes used) for "CONNECT host:port" or an absolute-form http:// request."""
    split = split_http_head(data)
    if split is None:
        return None
    request_line, headers, used = split
    parts = request_line.split(b" ")
    if len(parts) != 3 or not TOKEN_RE.match(parts[0]) or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ProtocolError("malformed request line")
    method, target, version = (p.decode("ascii", "replace") for p in parts)
    if not target.isascii() or not target.isprintable():
        raise ProtocolError("malformed request target")
    names = [name.lower() for name, _ in headers]
    hosts = [value for name, value in headers if name.lower() == "host"]
    if len(hosts) > 1:
        raise ProtocolError("more than one Host header")
    if method == "CONNECT":
        host, port = parse_authority(target)
        if hosts and not _same_host(parse_authority(hosts[0], port)[0], host):
            raise ProtocolError("Host header does not match the CONNECT target")
        return Request("http-connect", host.strip("[]") if host.startswith("[") else host, port), used
    if target[:7].lower() != "http://":
        if target.startswith("/"):
            raise ProtocolError("this is a proxy: send absolute-form (http://host/...) or CONNECT")
        raise ProtocolError("only http:// URLs can be proxied; use CONNECT for https")
    after_scheme = target[7:]
    end = min((i for i in map(after_scheme.find, "/?#") if i >= 0), default=len(after_scheme))
    authority, path = after_scheme[:end], after_scheme[end:]
    if "@" in authority or "#" in path:
        raise ProtocolError("user info or fragment in URL")
    if not path.startswith("/"):
        path = "/" + path
    host, port = parse_authority(authority, 80)
    if hosts:
        header_host, header_port = parse_authority(hosts[0], 80)
        if header_port != port or not _same_host(header_host, host):
            raise ProtocolError("Host header does not match the URL")
    if "transfer-encoding" in names:
        raise ProtocolError("chunked request bodies are not supported through this proxy", http=411)
    lengths = {value for name, value in headers if name.lower() == "content-length"}
    if len(lengths) > 1 or not all(v.isdigit() for v in lengths):
        raise ProtocolError("conflicting or malformed Content-Length")
    body_length = int(lengths.pop()) if lengths else 0
    listed = {token.strip().lower() for name, value in headers if name.lower() == "connection"
              for token in value.split(",")}
    kept = [f"{name}: {value}\r\n" for name, value in headers
            if name.lower() not in HOP_BY_HOP and name.lower() not in listed
            and name.lower() != "host" and not name.lower().startswith("proxy-")]
    head = f"{method} {path} {version}\r\nHost: {authority}\r\n{''.join(kept)}Connection: close\r\n\r\n"
    host = host.strip("[]") if host.startswith("[") else host
    return Request("http", host, port, head.encode("ascii"), body_length), used


def parse_client_hello(data):
    """Look at the first bytes of a tunnel: return None (need more), ("not-tls", None),
    ("no-sni", None) or ("sni", name). Raise ProtocolError for a malformed TLS ClientHello."""
    if not data:
        return None
    if data[0] != 0x16:
        return NOT_TLS, None
    handshake = bytearray()
    offset = 0
    while True:
        if len(data) < offset + 5:
            return None
        if data[offset] != 0x16 or data[offset + 1] != 3:
            raise ProtocolError("malformed TLS record")
        length = struct.unpack("!H", data[offset + 3:offset + 5])[0]
        if len(data) < offset + 5 + length:
            return None
        handshake += data[offset + 5:offset + 5 + length]
        offset += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise ProtocolError("first TLS handshake message is not a ClientHello")
            total = 4 + int.from_bytes(handshake[1:4], "big")
            if total > MAX_CLIENT_HELLO:
                raise ProtocolError("ClientHello too large")
            if len(handshake) >= total:
                return _find_sni(bytes(handshake[4:total]))


def _find_sni(hello):
    try:
        position = 2 + 32
        position += 1 + hello[position]
        position += 2 + struct.unpack("!H", hello[position:position + 2])[0]
        position += 1 + hello[position]
        if position == len(hello):
            return NO_SNI, None
        end = position + 2 + struct.unpack("!H", hello[position:position + 2])[0]
        position += 2
        while position + 4 <= end:
            kind, length = struct.unpack("!HH", hello[position:position + 4])
            position += 4
            if kind == 0:
                entries = hello[position + 2:position + length]
                if entries[0] != 0:
                    raise ProtocolError("SNI entry is not a host name")
                name_length = struct.unpack("!H", entries[1:3])[0]
                return "sni", entries[3:3 + name_length].decode("latin-1")
            position += length
        return NO_SNI, None
    except (IndexError, struct.error):
        raise ProtocolError("truncated ClientHello") from None


# ---------------------------------------------------------------------------------------------
# Replies: what a client is told, in its own protocol, when its request goes through, is
# refused or fails.

def socks5_reply(code, address=None, port=0):
    """A full-length SOCKS5 reply (clients read at least 10 bytes)."""
    if address is not None and address.version == 6:
        return bytes((5, code, 0, 4)) + address.packed + struct.pack("!H", port)
    packed = address.packed if address is not None else b"\0\0\0\0"
    return bytes((5, code, 0, 1)) + packed + struct.pack("!H", port)


def socks4_reply(granted):
    return bytes((0, SOCKS4_GRANTED if granted else SOCKS4_REJECTED)) + b"\0" * 6


HTTP_PHRASES = {400: "Bad Request", 403: "Forbidden", 411: "Length Required",
                431: "Request Header Fields Too Large", 502: "Bad Gateway",
                503: "Service Unavailable", 504: "Gateway Timeout"}


def http_reply(status, message, proxy_error):
    """A complete HTTP error response with a short plain-text body, closing the connection."""
    body = (message + "\n").encode("utf-8", "replace")
    head = (f"HTTP/1.1 {status} {HTTP_PHRASES[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nX-Proxy-Error: {proxy_error}\r\n\r\n")
    return head.encode("ascii") + body


def refusal(proto, socks5_code, http_status, message, proxy_error):
    """The reply refusing a request, in its protocol: the SOCKS5 reply code, a SOCKS4
    rejection, or an HTTP error (407 asks for the proxy credential)."""
    if proto == "socks5":
        return socks5_reply(socks5_code)
    if proto == "socks4a":
        return socks4_reply(False)
    if http_status == 407:
        return proxy_auth_reply()
    return http_reply(http_status, message, proxy_error)


def connected_reply(proto, upstream):
    """What a client is told once its upstream is connected: SOCKS5 with the address the proxy
    connected from, SOCKS4 granted, HTTP CONNECT 200; b"" for plain HTTP (the answer follows)."""
    if proto == "socks5":
        bound_host, bound_port = upstream.getsockname()[:2]
        return socks5_reply(SOCKS5_SUCCEEDED, ipaddress.ip_address(bound_host), bound_port)
    if proto == "socks4a":
        return socks4_reply(True)
    if proto == "http-connect":
        return b"HTTP/1.1 200 Connection established\r\n\r\n"
    return b""


def denial_message(host, port, verdict, address=None):
    """What a denied HTTP client is told: who was refused, why, and which rule would allow it.
    `address`: the private address an allowed name resolved to; its rule is the fix, not the
    name's (which is already there)."""
    shown = host_port(display_host(host), port)
    text = f"socks_filter: connection to {shown} denied ({verdict.reason}: {verdict.detail})."
    if address is not None:
        also = " or use --allow-private" if address_class(address) == "private-use" else ""
        text += (f"\nTo allow it, add the IP rule '{format_address(address, port)}' (only if you "
                 f"mean to reach that address){also}.")
    elif REASONS.get(verdict.reason, (None, False))[1]:
        text += f"\nTo allow it, add the allow rule '{shown}'."
    return text


# Upstream failures (FAILURE_REASONS): the log reason, the SOCKS5 reply and the HTTP status.
CONNECT_FAILURES = {
    errno.ECONNREFUSED: (CONNECT_REFUSED, SOCKS5_CONNECTION_REFUSED, 502),
    errno.ENETUNREACH: (UNREACHABLE, SOCKS5_NETWORK_UNREACHABLE, 502),
    errno.EHOSTUNREACH: (UNREACHABLE, SOCKS5_HOST_UNREACHABLE, 502),
    errno.ETIMEDOUT: (CONNECT_TIMED_OUT, SOCKS5_HOST_UNREACHABLE, 504),
}
LOOKUP_FAILURE = (LOOKUP_FAILED, SOCKS5_HOST_UNREACHABLE, 502)
TIMEOUT_FAILURE = (CONNECT_TIMED_OUT, SOCKS5_HOST_UNREACHABLE, 504)
OTHER_FAILURE = (CONNECT_FAILED, SOCKS5_GENERAL_FAILURE, 502)


# ---------------------------------------------------------------------------------------------
# The relay: a connection's bytes in both directions, once its destination is decided and
# checked. Relayed bytes move socket -> pipe -> socket with splice(), never through Python.

class Direction:
    """Bytes flowing one way between two sockets.

    The pipe is the buffer, created on the first read, holding at most one read (RELAY_CHUNK)
    that the target has not taken yet. `pending` holds only the bytes the handshake already read.
    """

    def __init__(self, source, target, limit=None):
        self.source, self.target = source, target
        self.pending = b""
        self.limit = limit          # bytes still to forward, or None for no limit
        self.ended = False          # the source finished (EOF or limit reached)
        self.shut = False           # the end was passed on to the target
        self.count = 0
        self.pipe = None
        self.in_pipe = 0

    def waiting(self):
        """True while bytes read from the source wait to be written to the target."""
        return bool(self.pending) or self.in_pipe > 0


class PipePool:
    """Relay pipes kept for reuse: an empty pipe of a finished connection serves the next one,
    saving four system calls a direction on every short connection."""

    def __init__(self, keep=64):
        self.keep = keep
        self.spare = []

    def take(self):
        if self.spare:
            return self.spare.pop()
        read_end, write_end = os.pipe()
        try:
            fcntl.fcntl(write_end, F_SETPIPE_SZ, RELAY_CHUNK)
        except OSError:
            pass
        return read_end, write_end

    def give_back(self, pipe):
        """Keep the pipe only when the kernel says it is empty: bytes of one connection must
        never reach another."""
        if len(self.spare) < self.keep:
            try:
                waiting = struct.unpack("i", fcntl.ioctl(pipe[0], termios.FIONREAD, b"\0\0\0\0"))[0]
            except OSError:
                waiting = -1
            if waiting == 0:
                self.spare.append(pipe)
                return
        os.close(pipe[0])
        os.close(pipe[1])

    def close(self):
        for read_end, write_end in self.spare:
            os.close(read_end)
            os.close(write_end)
        self.spare = []


def try_read(sock, size):
    """What one non-blocking recv got: None when nothing is there yet, b"" at the end or on an
    error (the peer is gone either way)."""
    try:
        return sock.recv(size)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def try_write(end, operation, *args, **options):
    """One non-blocking send or splice: the bytes it wrote, 0 when the target is full, or None
    when it failed: end(CLOSED) has then closed the connection."""
    try:
        return operation(*args, **options)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError:
        end(CLOSED)
        return None


class Relay:
    """Both directions of one connection: `up` (client to upstream) and `down`. A side is read
    only while nothing read from it waits to be written; the end of one direction is passed on
    as a half-close, and the relay ends when both directions have ended.

    A plain-HTTP request (`body_limit` given: the request body's length) relays one request:
    the upload ends after the body without a half-close, and the answer's end ends the relay.
    From its connection the relay uses only `end`, the connection's close(reason), which calls
    release(); from the server, watch() and pipes.
    """

    def __init__(self, server, client, upstream, end, body_limit=None):
        self.server, self.client, self.upstream, self.end = server, client, upstream, end
        self.one_request = body_limit is not None
        self.up = Direction(client, upstream, body_limit)
        self.down = Direction(upstream, client)
        self.closed = False

    def start(self, head, body, to_client, counted_up, counted_down):
        """Begin with what the handshake already holds: a request `head` and the first `body`
        bytes for the upstream, `to_client` for the client, and the bytes already relayed."""
        if self.client.family == socket.AF_UNIX:
            # The default 208 KiB unix send buffer cannot take one 256 KiB splice (measured:
            # 547 would-block splices per 2 GiB, none with this). TCP sizes its own buffers.
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 2 * RELAY_CHUNK)
        up, down = self.up, self.down
        down.pending = to_client
        if up.limit is not None:
            up.limit -= len(body)
            up.ended = up.limit == 0
        up.pending = head + body
        up.count = len(up.pending) + counted_up
        down.count = counted_down
        self.flush(up)
        if not self.closed:
            self.flush(down)
        if not self.closed:
            self.update_events()

    def release(self):
        """The connection closed: give the pipes back (the connection closes the sockets)."""
        self.closed = True
        for direction in (self.up, self.down):
            if direction.pipe is not None:
                self.server.pipes.give_back(direction.pipe)
                direction.pipe = None

    # -- events -------------------------------------------------------------------------------

    def on_client(self, events):
        self.on_ready(self.down, self.up, events)

    def on_upstream(self, events):
        self.on_ready(self.up, self.down, events)

    def on_ready(self, to_side, from_side, events):
        """A side's events: write what waits for it, then read it."""
        if self.closed:
            return
        if events & selectors.EVENT_WRITE:
            self.flush(to_side)
            if not self.closed:
                self.update_events()
        if events & selectors.EVENT_READ and not self.closed:
            self.read(from_side)

    def update_events(self):
        """Read a side only while nothing waits to be written for it; write where bytes wait."""
        client_events = upstream_events = 0
        if not self.up.ended and not self.up.waiting():
            client_events |= selectors.EVENT_READ
        if not self.down.ended and not self.down.waiting():
            upstream_events |= selectors.EVENT_READ
        if self.up.waiting():
            upstream_events |= selectors.EVENT_WRITE
        if self.down.waiting():
            client_events |= selectors.EVENT_WRITE
        self.server.watch(self.client, client_events, self.on_client)
        self.server.watch(self.upstream, upstream_events, self.on_upstream)

    # -- moving bytes -------------------------------------------------------------------------

    def read(self, direction):
        """One splice from the source into the pipe, then at once on to the target."""
        want = RELAY_CHUNK if direction.limit is None else min(RELAY_CHUNK, direction.limit)
        if direction.pipe is None:
            try:
                direction.pipe = self.server.pipes.take()
            except OSError:
                self.end(OUT_OF_DESCRIPTORS)
                return
        try:
            received = os.splice(direction.source.fileno(), direction.pipe[1], want, flags=SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.end(CLOSED)
            return
        if received == 0:
            direction.ended = True
            self.pass_end(direction)
            return
        direction.count += received
        direction.in_pipe = received
        if direction.limit is not None:
            direction.limit -= received
            direction.ended = direction.limit == 0
        sent = try_write(self.end, os.splice, direction.pipe[0], direction.target.fileno(),
                         received, flags=SPLICE_FLAGS)
        if sent is None:
            return
        direction.in_pipe -= sent
        if direction.in_pipe:
            self.update_events()
        elif direction.ended:
            self.pass_end(direction)

    def flush(self, direction):
        if direction.pending:
            sent = try_write(self.end, direction.target.send, direction.pending)
            if sent is None:
                return
            direction.pending = direction.pending[sent:]
        if not direction.pending and direction.in_pipe:
            sent = try_write(self.end, os.splice, direction.pipe[0], direction.target.fileno(),
                             direction.in_pipe, flags=SPLICE_FLAGS)
            if sent is None:
                return
            direction.in_pipe -= sent
        if not direction.waiting() and direction.ended:
            self.pass_end(direction)

    def pass_end(self, direction):
        """The source finished and everything is written: pass the end on, or end the relay if
        both directions ended (one request: once the answer ended)."""
        if self.closed:
            return
        if direction.waiting():
            self.update_events()
            return
        if not direction.shut:
            direction.shut = True
            if not (self.one_request and direction is self.up):
                try:
                    direction.target.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
        if (self.up.shut and self.down.shut) or (self.one_request and self.down.shut):
            self.end(CLOSED)
        else:
            self.update_events()


# ---------------------------------------------------------------------------------------------
# A client's connection: its handshake says where it wants to go, the policy decides, the
# lookup and connect find the upstream, a tunnel to a name is checked, then the relay runs.

class Stage:
    """Where a Connection is, by what it waits for. The first six read the client's request."""

    START = "start"                         # the first byte, which picks the protocol
    SOCKS5_GREETING = "socks5-greeting"     # the SOCKS5 greeting's list of methods
    SOCKS5_AUTH = "socks5-auth"             # the RFC 1929 user name and password (--token-env)
    SOCKS5_REQUEST = "socks5-request"       # the SOCKS5 CONNECT request
    SOCKS4 = "socks4"                       # a SOCKS4 or SOCKS4a request
    HTTP = "http"                           # an HTTP request head
    CONNECTING = "connecting"               # the lookup and the upstream connect (client unread)
    SNI = "sni"                             # a tunnel's first ClientHello (nothing sent on yet)
    SERVER_HELLO = "server-hello"           # the server's answer to it, up to its ServerHello
    RETRY_HELLO = "retry-hello"             # after a HelloRetryRequest: the second ClientHello
    RELAY = "relay"                         # both directions relayed (Relay)
    CLOSING = "closing"                     # a final reply being written
    DRAINING = "draining"                   # reply written: the client's last bytes are dropped


# The log's "proto" for a request found malformed in each handshake stage.
STAGE_PROTOCOLS = {Stage.SOCKS5_GREETING: "socks5", Stage.SOCKS5_AUTH: "socks5",
                   Stage.SOCKS5_REQUEST: "socks5", Stage.SOCKS4: "socks4a", Stage.HTTP: "http"}
STAGE_PARSERS = {Stage.SOCKS5_REQUEST: parse_socks5_request, Stage.SOCKS4: parse_socks4_request,
                 Stage.HTTP: parse_http_request}
HELLO_STAGES = (Stage.SERVER_HELLO, Stage.RETRY_HELLO)      # TlsCheck reads both sides


class Handshake:
    """A client's first bytes, up to where it wants to go: the first byte picks the protocol,
    a SOCKS5 client then picks a method (with --token-env the session's password, RFC 1929),
    and the request (SOCKS5, SOCKS4 or SOCKS4a, or an HTTP head) becomes the connection's
    Request, which the connection decides on. A client without the session's credential is
    refused before anything about its destination is looked at."""

    def __init__(self, connection):
        self.connection = connection
        self.authenticated = connection.server.token is None

    def feed(self, data):
        connection = self.connection
        connection.inbuf += data
        try:
            self.advance()
        except ProtocolError as error:
            self.reject_malformed(error)

    def advance(self):
        """Move through the handshake as far as the bytes received allow."""
        connection = self.connection
        if connection.stage == Stage.START:
            first = connection.inbuf[0]
            if first == 5:
                connection.stage = Stage.SOCKS5_GREETING
            elif first == 4:
                connection.stage = Stage.SOCKS4
            elif chr(first).isalpha() and chr(first).isascii():
                connection.stage = Stage.HTTP
            else:
                raise ProtocolError("unknown protocol")
        if connection.stage == Stage.SOCKS5_GREETING and not self.socks5_greeting():
            return
        if connection.stage == Stage.SOCKS5_AUTH and not self.socks5_authenticate():
            return
        parser = STAGE_PARSERS.get(connection.stage)
        if parser is None or not connection.inbuf:
            return
        parsed = parser(connection.inbuf)
        if parsed is not None:
            connection.request, used = parsed
            if connection.stage == Stage.HTTP:
                password = http_proxy_password(connection.inbuf[:used])
                self.authenticated = connection.server.accepts(password)
            del connection.inbuf[:used]
            if not self.authenticated:
                proto = connection.request.proto
                self.unauthenticated(proto, refusal(proto, SOCKS5_NOT_ALLOWED, 407, "", ""))
                return
            connection.decide()

    def take(self, parse):
        """The next message, parsed and removed from the buffer, or None until it is whole."""
        parsed = parse(self.connection.inbuf)
        if parsed is None:
            return None
        value, used = parsed
        del self.connection.inbuf[:used]
        return value

    def answer(self, reply, stage):
        """A handshake step is done: its reply sent, the next stage set (True)."""
        self.connection.send_to_client(reply)
        self.connection.stage = stage
        return True

    def socks5_greeting(self):
        """True once the method is picked and answered; no acceptable one ends the connection."""
        connection = self.connection
        methods = self.take(parse_socks5_greeting)
        if methods is None:
            return False
        method = (SOCKS5_NO_AUTHENTICATION if connection.server.token is None
                  else SOCKS5_USERNAME_PASSWORD)
        if method not in methods:
            self.unauthenticated("socks5", SOCKS5_NO_ACCEPTABLE_METHODS)
            return False
        return self.answer(bytes((5, method)), Stage.SOCKS5_REQUEST
                           if method == SOCKS5_NO_AUTHENTICATION else Stage.SOCKS5_AUTH)

    def socks5_authenticate(self):
        """RFC 1929: True once the session's password came; a wrong one ends the connection."""
        connection = self.connection
        password = self.take(parse_socks5_userpass)
        if password is None:
            return False
        if not connection.server.accepts(password):
            self.unauthenticated("socks5", USERPASS_FAILURE)
            return False
        self.authenticated = True
        return self.answer(USERPASS_SUCCESS, Stage.SOCKS5_REQUEST)

    def reject_malformed(self, error):
        connection = self.connection
        stage = connection.stage
        connection.server.log.decision(connection.id, STAGE_PROTOCOLS.get(stage, "unknown"), "", 0,
                                       Verdict(False, BAD_REQUEST, str(error)))
        if stage == Stage.SOCKS5_GREETING:
            connection.finish_with(SOCKS5_NO_ACCEPTABLE_METHODS)
        elif stage == Stage.SOCKS5_AUTH:
            connection.finish_with(USERPASS_FAILURE)
        elif stage == Stage.SOCKS5_REQUEST:
            connection.finish_with(socks5_reply(error.socks5))
        elif stage == Stage.SOCKS4:
            connection.finish_with(socks4_reply(False))
        elif stage == Stage.HTTP:
            connection.finish_with(http_reply(error.http, f"socks_filter: {error}", BAD_REQUEST))
        else:
            connection.close()

    def unauthenticated(self, proto, reply):
        """A client without the session's credential (another local user, in advisory mode)."""
        connection = self.connection
        request = connection.request
        connection.server.log.decision(connection.id, proto, request.host if request else "",
                                       request.port if request else 0,
                                       Verdict(False, PROXY_AUTH, "no valid proxy credential"))
        connection.finish_with(reply)


class TlsCheck:
    """The start of a tunnel to a name, checked before anything else reaches the upstream (see
    "What a tunnel may carry"): the client's first bytes must be a ClientHello naming the
    requested host. That hello is sent on and the server's answer read through Python up to its
    ServerHello; after a HelloRetryRequest the client's second ClientHello must name the host
    too. Then the connection starts its relay. A tunnel refused here is logged denied only."""

    def __init__(self, connection):
        self.connection = connection
        self.upstream_pending = b""     # the checked ClientHello, on its way
        self.server_reply = None        # what the server answered it, until its ServerHello
        self.relayed_up = self.relayed_down = 0     # bytes relayed through Python

    def start(self):
        """The tunnel is open: wait for the client's ClientHello, the upstream not read."""
        connection, server = self.connection, self.connection.server
        connection.stage = Stage.SNI
        server.mark_idle(connection)
        server.set_deadline(connection, HANDSHAKE_TIMEOUT)
        server.unwatch(connection.upstream)
        server.watch(connection.client, selectors.EVENT_READ, connection.on_client_event)
        self.check_first_hello()

    def check_first_hello(self):
        connection = self.connection
        found = tunnel_start(connection.inbuf)
        if found is None:
            return
        kind, value = found
        if kind != "sni":
            self.refuse_start(kind, value)
            return
        if not self.names_target(value):
            self.deny(f"TLS server name {value[:255]!r} is not {connection.target}")
            return
        try:
            end = client_hello_end(connection.inbuf)
        except ProtocolError as error:
            self.refuse_start(BAD_CLIENT_HELLO, f"bad ClientHello: {error}")
            return
        connection.log_allowed(connection.verdict, "tls")
        self.watch_server_hello(end)

    def names_target(self, server_name):
        try:
            return canonical_name(server_name) == self.connection.target
        except BadName:
            return False

    def refuse_start(self, reason, detail):
        """Not a ClientHello with a server name first: closed, unless audit mode, which lets
        it through as a raw stream and logs so (--learn then writes a /raw rule)."""
        connection = self.connection
        if connection.server.policy.mode != "audit":
            self.deny(detail, reason)
            return
        connection.server.clear_deadline(connection)
        verdict = connection.verdict if not connection.verdict.enforced else Verdict(
            True, reason, f"{detail}; a {RAW_SUFFIX} rule would allow it", enforced=False)
        connection.log_allowed(verdict, "raw")
        connection.start_relay()

    def deny(self, detail, reason=SNI_MISMATCH):
        connection = self.connection
        log = connection.server.log
        if connection.logged_decision:      # allowed on its first ClientHello: counted denied only
            log.retract_allowed()
        log.decision(connection.id, connection.request.proto, connection.target,
                     connection.request.port, Verdict(False, reason, detail))
        connection.logged_decision = True
        connection.close(reason)

    def on_client_eof(self):
        """Logged, or the summary would not know the tunnel was tried."""
        self.deny("the client closed the tunnel before a whole ClientHello", NOT_TLS)

    def on_timeout(self):
        stage = self.connection.stage
        if stage == Stage.SNI:
            self.refuse_start(TLS_TIMEOUT, "no complete ClientHello in time")
        elif stage == Stage.SERVER_HELLO:
            self.deny("no ServerHello from the server in time", BAD_SERVER_HELLO)
        else:
            self.deny("no second ClientHello after a HelloRetryRequest in time", TLS_TIMEOUT)

    # -- after the checked ClientHello: a HelloRetryRequest? --------------------------------

    def watch_server_hello(self, end):
        """Send the checked ClientHello on and read the server's answer through Python until its
        first handshake message (server_hello_kind); hold what the client sends meanwhile."""
        connection = self.connection
        connection.stage = Stage.SERVER_HELLO
        connection.server.set_deadline(connection, HANDSHAKE_TIMEOUT)
        self.upstream_pending = bytes(connection.inbuf[:end])
        del connection.inbuf[:end]
        self.server_reply = bytearray()
        self.flush_upstream_pending()
        if not connection.closed:
            self.watch_events()

    def watch_events(self):
        """The server is read until its ServerHello; the client while what it sent fits a hello."""
        connection = self.connection
        upstream = selectors.EVENT_READ if connection.stage == Stage.SERVER_HELLO else 0
        upstream |= selectors.EVENT_WRITE if self.upstream_pending else 0
        client = selectors.EVENT_READ if len(connection.inbuf) <= MAX_CLIENT_HELLO + 1024 else 0
        client |= selectors.EVENT_WRITE if connection.client_pending else 0
        connection.server.watch(connection.upstream, upstream, connection.on_upstream_event)
        connection.server.watch(connection.client, client, connection.on_client_event)

    def on_upstream(self, events):
        if events & selectors.EVENT_WRITE:
            self.flush_upstream_pending()
        if events & selectors.EVENT_READ and not self.connection.closed:
            self.read_server_hello()
        self.rewatch()

    def on_client(self, events):
        if events & selectors.EVENT_WRITE:
            self.connection.flush_client_pending()
        if events & selectors.EVENT_READ and not self.connection.closed:
            self.read_client()
        self.rewatch()

    def rewatch(self):
        if not self.connection.closed and self.connection.stage in HELLO_STAGES:
            self.watch_events()

    def flush_upstream_pending(self):
        sent = try_write(self.connection.close, self.connection.upstream.send,
                         self.upstream_pending)
        if sent:
            self.upstream_pending = self.upstream_pending[sent:]
            self.relayed_up += sent

    def read_server_hello(self):
        connection = self.connection
        data = try_read(connection.upstream, RELAY_CHUNK)
        if data is None:
            return
        if not data:                # the server hung up (after an alert): pass that on
            self.server_reply = None
            connection.finish_with(b"")
            return
        self.relayed_down += len(data)
        connection.send_to_client(data)
        if connection.closed:
            return
        self.server_reply += data
        try:
            kind = server_hello_kind(self.server_reply)
        except ProtocolError as error:
            self.deny(f"bad answer to the ClientHello: {error}", BAD_SERVER_HELLO)
            return
        if kind is None:
            return
        self.server_reply = None
        if kind == "server-hello":
            self.end()
        else:
            connection.stage = Stage.RETRY_HELLO
            connection.server.set_deadline(connection, HANDSHAKE_TIMEOUT)
            self.check_retry_hello()

    def read_client(self):
        connection = self.connection
        data = try_read(connection.client, 16384)
        if data is None:
            return
        if data:
            connection.inbuf += data
            if connection.stage == Stage.RETRY_HELLO:
                self.check_retry_hello()
        elif connection.stage == Stage.RETRY_HELLO:
            self.deny("the client closed the tunnel before its second ClientHello", NOT_TLS)
        else:
            connection.close()

    def check_retry_hello(self):
        """After a HelloRetryRequest: the client's second ClientHello must name the host too."""
        inbuf = self.connection.inbuf
        found = retry_hello_start(inbuf)
        if found is None:
            return
        kind, value = found
        if kind == "sni" and not self.names_target(value):
            kind, value = SNI_MISMATCH, (f"TLS server name {value[:255]!r} is not "
                                         f"{self.connection.target}")
        if kind == "sni":
            try:
                client_hello_end(inbuf[6 if inbuf[0] == 0x14 else 0:])
            except ProtocolError as error:
                kind, value = BAD_CLIENT_HELLO, f"bad ClientHello: {error}"
        if kind != "sni":
            self.deny(f"after a HelloRetryRequest: {value}", kind)
            return
        self.end()

    def end(self):
        """The handshake is past the point where a name can change: relay with splice."""
        connection = self.connection
        connection.server.clear_deadline(connection)
        connection.inbuf[:0] = self.upstream_pending
        self.upstream_pending = b""
        connection.start_relay(self.relayed_up, self.relayed_down)


class Dialer:
    """The upstream connect: the checked addresses tried in the order given, each without
    blocking, until one accepts (within the connection's CONNECT_TIMEOUT deadline). The
    connection gets on_upstream_connected() or fail()."""

    def __init__(self, connection, addresses):
        self.connection, self.candidates = connection, list(addresses)

    def connect_next(self, failure=OTHER_FAILURE):
        connection = self.connection
        port = connection.request.port
        if not self.candidates:
            connection.fail(failure, f"cannot connect to {connection.log_host()}:{port}")
            return
        address = self.candidates.pop(0)
        connection.address = address
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        try:
            upstream = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            connection.fail(OTHER_FAILURE, "out of sockets")
            return
        upstream.setblocking(False)
        connection.upstream = upstream
        code = upstream.connect_ex((str(address), port))
        if code in (0, errno.EINPROGRESS):
            connection.server.watch(upstream, selectors.EVENT_WRITE, connection.on_upstream_event)
        else:
            connection.drop_upstream()
            self.connect_next(CONNECT_FAILURES.get(code, OTHER_FAILURE))

    def on_writable(self):
        """The connect finished: connected, or on to the next address."""
        connection = self.connection
        code = connection.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code != 0:
            connection.drop_upstream()
            self.connect_next(CONNECT_FAILURES.get(code, OTHER_FAILURE))
            return
        connection.on_upstream_connected()


class Connection:
    """One client, from accept to close: its Handshake says where it wants to go, decide()
    asks the policy, the lookup and connect find the upstream, a TlsCheck checks a tunnel to a
    name, then a Relay moves the bytes. A refusal or failure is a final reply (finish_with),
    after which what the client still sends is read and dropped until it closes.

    The selector calls on_client_event and on_upstream_event (the relay registers its own);
    the server calls on_resolved, on_timeout and close.
    """

    def __init__(self, server, client, connection_id, refusing=False):
        self.server, self.client, self.id = server, client, connection_id
        self.started = time.monotonic()
        self.inbuf = bytearray()
        self.stage = Stage.START
        self.refusing = refusing
        self.request = None
        self.upstream = None
        self.address = None         # the address connected to (or tried last)
        self.closed = False
        self.deadline = None
        self.verdict = self.kind = self.target = None
        self.raw = False            # a /raw rule allows this name and port: no TLS check
        self.handshake = Handshake(self)
        self.dialer = self.tls = self.relay = None
        self.client_pending = b""
        self.logged_decision = False
        self.closed_logged = False
        self.drained = 0

    # -- decision ---------------------------------------------------------------------------

    def decide(self):
        request = self.request
        self.server.mark_busy(self)
        if self.refusing:
            self.deny(Verdict(False, TOO_MANY_CONNECTIONS, "the proxy is at its connection limit"),
                      socks5_code=SOCKS5_GENERAL_FAILURE, http_status=503,
                      proxy_error=TOO_MANY_CONNECTIONS)
            return
        verdict = self.server.policy.check_request(request.host, request.port)
        if not verdict.allowed:
            self.deny(verdict)
            return
        kind, value = classify_host(request.host)
        self.verdict = verdict
        self.kind, self.target = kind, value
        self.raw = kind == "name" and allows_raw(self.server.policy, value, request.port)
        self.server.unwatch(self.client)
        self.stage = Stage.CONNECTING
        self.server.set_deadline(self, CONNECT_TIMEOUT)
        if kind == "ip":
            self.connect([value])
        else:
            self.server.resolve(self, value, request.port)

    def deny(self, verdict, address=None, socks5_code=SOCKS5_NOT_ALLOWED, http_status=403,
             proxy_error="blocked-by-allowlist"):
        request = self.request
        self.server.log.decision(self.id, request.proto, request.host, request.port, verdict,
                                 address=address)
        self.finish_with(refusal(request.proto, socks5_code, http_status,
                                 denial_message(request.host, request.port, verdict, address),
                                 proxy_error))

    def log_allowed(self, verdict, tunnel=None):
        self.logged_decision = True
        self.server.log.decision(self.id, self.request.proto, self.log_host(), self.request.port,
                                 verdict, tunnel=tunnel)

    def log_host(self):
        return str(self.target) if self.kind == "ip" else self.target

    def wants_sni_check(self):
        """A tunnel to a name, on any port, unless a /raw rule allows it (see TUNNEL_REFUSALS)."""
        return (self.server.sni_check and self.kind == "name" and self.request.proto != "http"
                and not self.raw)

    def on_resolved(self, addresses, error):
        if self.closed or self.stage != Stage.CONNECTING:
            return
        if error is not None or not addresses:
            self.fail(LOOKUP_FAILURE, f"lookup of {self.target} failed")
            return
        verdict, address = self.server.policy.check_resolved(self.target, addresses,
                                                             self.request.port)
        if verdict is not None:
            self.deny(verdict, address)
            return
        self.connect(addresses)

    # -- upstream connect -------------------------------------------------------------------

    def connect(self, addresses):
        """Allowed: log so now, or, for a tunnel whose TLS server name is still to be checked,
        once it is (a tunnel refused for its name counts as denied only); then connect."""
        if not self.wants_sni_check():
            self.log_allowed(self.verdict, "raw" if self.raw else None)
        self.dialer = Dialer(self, addresses)
        self.dialer.connect_next()

    def drop_upstream(self):
        self.server.unwatch(self.upstream)
        self.upstream.close()
        self.upstream = None

    def on_upstream_connected(self):
        self.server.clear_deadline(self)
        self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reply = connected_reply(self.request.proto, self.upstream)
        if reply:
            self.send_to_client(reply)
        if self.wants_sni_check():
            self.tls = TlsCheck(self)
            self.tls.start()
        else:
            self.start_relay()

    def start_relay(self, relayed_up=0, relayed_down=0):
        """Hand the sockets to a Relay, with what the handshake holds for either side."""
        self.server.mark_busy(self)
        request = self.request
        limit = request.body_length if request.proto == "http" else None
        self.relay = Relay(self.server, self.client, self.upstream, self.close, limit)
        to_client, self.client_pending = self.client_pending, b""
        body, self.inbuf = bytes(self.inbuf[:limit]), bytearray()
        self.stage = Stage.RELAY
        self.handshake = self.dialer = self.tls = None     # done: hundreds of relays may run
        self.relay.start(request.head, body, to_client, relayed_up, relayed_down)

    # -- events -----------------------------------------------------------------------------

    def on_upstream_event(self, events):
        if self.closed:
            return
        if self.stage == Stage.RELAY:
            self.relay.on_upstream(events)
        elif self.stage in HELLO_STAGES:
            self.tls.on_upstream(events)
        else:
            self.dialer.on_writable()

    def on_client_event(self, events):
        if self.closed:
            return
        if self.stage == Stage.RELAY:
            self.relay.on_client(events)
            return
        if self.stage in HELLO_STAGES:
            self.tls.on_client(events)
            return
        if events & selectors.EVENT_WRITE:
            self.flush_client_pending()
            if self.closed or not events & selectors.EVENT_READ:
                return
        data = try_read(self.client, 4096)
        if data is None:
            return
        if not data:
            if self.stage == Stage.SNI:
                self.tls.on_client_eof()
            self.close()
        elif self.stage in (Stage.CLOSING, Stage.DRAINING):
            self.drained += len(data)
            if self.drained > MAX_DRAIN_BYTES:
                self.close()
        elif self.stage == Stage.SNI:
            self.inbuf += data
            self.tls.check_first_hello()
        else:
            self.handshake.feed(data)

    def on_timeout(self):
        if self.stage == Stage.CONNECTING:
            self.fail(TIMEOUT_FAILURE, f"no connection to {self.request.host}:{self.request.port} "
                                       f"within {CONNECT_TIMEOUT:g}s")
        elif self.stage == Stage.SNI or self.stage in HELLO_STAGES:
            self.tls.on_timeout()
        else:
            self.close()

    # -- replies and endings ----------------------------------------------------------------

    def send_to_client(self, data):
        """Small handshake writes; whatever the kernel does not take waits in client_pending."""
        self.client_pending += data
        self.flush_client_pending()

    def flush_client_pending(self):
        if self.client_pending:
            sent = try_write(self.close, self.client.send, self.client_pending)
            if sent is None:
                return
            self.client_pending = self.client_pending[sent:]
        if self.stage == Stage.CLOSING and not self.client_pending:
            self.linger()
        elif self.stage not in (Stage.RELAY, Stage.CONNECTING, *HELLO_STAGES):
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.client_pending else 0)
            self.server.watch(self.client, events, self.on_client_event)

    def finish_with(self, reply):
        """Send a final reply, then close once it is written (or the closing deadline passes)."""
        self.stage = Stage.CLOSING
        self.server.mark_idle(self)
        self.server.set_deadline(self, CLOSING_TIMEOUT)
        if self.upstream is not None:
            self.drop_upstream()
        self.send_to_client(reply)

    def linger(self):
        """The final reply is written: end our side, but read (and drop) what the client is
        still sending until it closes, so that unread bytes do not make the kernel reset the
        connection before the client has read the reply."""
        self.stage = Stage.DRAINING
        try:
            self.client.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()
            return
        self.server.watch(self.client, selectors.EVENT_READ, self.on_client_event)

    def fail(self, failure, detail):
        reason, socks5_code, http_status = failure
        if not self.logged_decision:
            self.log_allowed(self.verdict)
        self.server.log.closed(self, reason)
        self.closed_logged = True
        self.finish_with(refusal(self.request.proto, socks5_code, http_status,
                                 f"socks_filter: {detail} ({reason}).", reason))

    def close(self, reason=CLOSED):
        if self.closed:
            return
        self.closed = True
        if self.logged_decision and not self.closed_logged:
            self.closed_logged = True
            self.server.log.closed(self, reason)
        self.server.forget(self)
        if self.relay is not None:
            self.relay.release()
        for sock in (self.client, self.upstream):
            if sock is not None:
                self.server.unwatch(sock)
                sock.close()


# ---------------------------------------------------------------------------------------------
# The decision log and the counters: one JSON object per decision and per close (--log), a
# line per decision on stderr (--verbose), and the counts behind the exit summary.

class DecisionLog:
    """Where decisions and closes are written and counted.

    stats: "allowed", "denied" and "failed" counts, and Counters of the hosts denied and of
    those audit mode let through although enforce mode would deny them.
    """

    def __init__(self, mode, verbose=False, stderr=None):
        self.mode, self.verbose = mode, verbose
        self.stderr = stderr or sys.stderr
        self.file = None
        self.size = 0
        self.stats = {"allowed": 0, "denied": 0, "failed": 0, "denied_hosts": collections.Counter(),
                      "audited_hosts": collections.Counter()}

    def open(self, path):
        try:
            self.file = open_log(path)
        except OSError as error:
            raise OSError(f"cannot open the log: {error}") from None

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None

    def write(self, record):
        """Append one record; past MAX_LOG_BYTES write a last record saying so and stop, so
        that a client making endless denied requests cannot fill the disk."""
        if self.file is None:
            return
        line = json.dumps(shell_inert(record), separators=(",", ":")) + "\n"
        self.size += len(line)
        if self.size > MAX_LOG_BYTES:
            line = json.dumps({"ts": record["ts"], "event": "log-full",
                               "detail": f"log stopped at {MAX_LOG_BYTES} bytes"}) + "\n"
            self.file.write(line)
            self.close()
            return
        self.file.write(line)

    def count_denied(self, key):
        self.stats["denied"] += 1
        _count_host(self.stats["denied_hosts"], key)

    def retract_allowed(self):
        """A tunnel logged allowed, then refused at its second ClientHello: counted denied only."""
        self.stats["allowed"] -= 1

    def decision(self, connection_id, proto, host, port, verdict, tunnel=None, address=None):
        host = display_host(host) if host else host
        record = {"ts": round(time.time(), 3), "event": "decision", "id": connection_id,
                  "proto": proto, "host": host, "port": port, "decision": verdict.decision,
                  "reason": verdict.reason, "detail": verdict.detail, "mode": self.mode}
        if tunnel:
            record["tunnel"] = tunnel
        if address is not None:
            record["address"] = format_address(address, port)
        if not verdict.enforced:
            record["enforced"] = False
        if verdict.allowed:
            self.stats["allowed"] += 1
            if not verdict.enforced:
                _count_host(self.stats["audited_hosts"], host_port(host, port))
        else:
            self.count_denied(host_port(host, port) if host else "(malformed request)")
        self.write(record)
        if self.verbose:
            action = "allow" if verdict.allowed else "DENY"
            if not verdict.enforced:
                action = "allow (audit: would deny)"
            print(f"socks_filter: #{connection_id} {proto} {host_port(host, port)} {action}: "
                  f"{verdict.reason} ({verdict.detail})", file=self.stderr, flush=True)

    def closed(self, connection, reason):
        """The close record of a logged connection (its id, request, log_host(), address,
        relay and started)."""
        request, relay = connection.request, connection.relay
        bytes_up, bytes_down = (relay.up.count, relay.down.count) if relay else (0, 0)
        record = {"ts": round(time.time(), 3), "event": "close", "id": connection.id,
                  "proto": request.proto, "host": connection.log_host(), "port": request.port,
                  "decision": "deny" if reason in TUNNEL_REFUSALS else "allow", "reason": reason,
                  "address": format_address(connection.address, request.port) if connection.address else None,
                  "bytes_up": bytes_up, "bytes_down": bytes_down,
                  "duration": round(time.monotonic() - connection.started, 3)}
        self.write(record)
        if reason in FAILURE_REASONS:       # allowed, but never connected: counted apart
            self.stats["allowed"] -= 1
            self.stats["failed"] += 1
        if self.verbose and reason != CLOSED:
            print(f"socks_filter: #{connection.id} {record['host']}:{request.port} failed: {reason}",
                  file=self.stderr, flush=True)

    def summary(self):
        """One line: counts, the denied hosts, and in audit mode the hosts enforce would deny."""
        stats = self.stats
        text = f"socks_filter: {stats['allowed']} allowed, {stats['denied']} denied"
        if stats["failed"]:
            text += f", {stats['failed']} failed to connect"
        text += _count_list(": ", stats["denied_hosts"])
        text += _count_list("; audit let through what enforce would deny: ", stats["audited_hosts"])
        return text


def _count_host(counter, key):
    """Count per host, but remember at most MAX_TRACKED_HOSTS of them: a client inventing a
    new name per request must not grow the proxy's memory."""
    if key not in counter and len(counter) >= MAX_TRACKED_HOSTS - 1:
        key = "(other hosts)"
    counter[key] += 1


def _count_list(prefix, counter, most=20):
    """ "prefix a (x3), b, and 4 more", or "" for an empty counter."""
    if not counter:
        return ""
    shown = [f"{key} (x{count})" if count > 1 else key for key, count in counter.most_common(most)]
    more = len(counter) - len(shown)
    return prefix + ", ".join(shown) + (f", and {more} more" if more > 0 else "")


# ---------------------------------------------------------------------------------------------
# The server: one selectors loop, non-blocking sockets, lookups in a small thread pool.

class FilterServer:
    """Accepts clients on its listeners and runs every Connection on one selectors loop.

    start() binds (raising OSError or ValueError with a readable message) and returns the
    addresses; serve_forever() runs until shutdown() is called from any thread or a signal
    handler, then closes every connection and releases everything. Also for callers: the
    addresses, connections (id -> open Connection), log (the DecisionLog: summary()) and
    stats (its counts).

    What a Connection (with its Handshake, Dialer, TlsCheck and Relay) may use, and no more:
        policy, sni_check, token        what to allow, and whether a password is needed
        accepts(password)               whether it is the session's
        log                             decision(), closed(), retract_allowed()
        pipes                           the PipePool
        watch(sock, events, handler)    selector registration: handler(events) is called;
        unwatch(sock)                   no events, or a closed socket
        set_deadline(connection, seconds)   connection.on_timeout() is called then,
        clear_deadline(connection)          unless cleared or set again first
        mark_idle(connection)           its slot may be taken by a newcomer at the limit
        mark_busy(connection)           its slot is its own (deciding, connecting, relaying)
        forget(connection)              it closed: the slot is free
        resolve(connection, name, port) a lookup; connection.on_resolved() gets the answer
    """

    def __init__(self, policy, listen, log_path=None, verbose=False,
                 max_connections=DEFAULT_MAX_CONNECTIONS, sni_check=True, stderr=None, token=None,
                 handed=None):
        self.policy = policy
        self.token = token          # bytes: the password every client must send (see above)
        self.listen_specs = list(listen)
        self.handed = dict(handed or {})    # unix path -> a socket the caller bound and made
                                            # listen there (--listen-fd): served, never unlinked
        self.log_path = log_path
        self.log = DecisionLog(policy.mode, verbose, stderr)
        self.max_connections = max_connections
        self.sni_check = sni_check
        self.ids = itertools.count(1)
        self.selector = selectors.DefaultSelector()
        self.listeners = []
        self.addresses = []
        self.owned_paths = []
        self.connections = {}       # id -> Connection, for every open client
        self.idle = {}              # clients holding a slot without relaying (in a handshake,
                                    # awaiting a ClientHello, or being refused), oldest first:
                                    # at the connection limit the oldest makes room for a newcomer
        self.registered = {}        # socket -> (events, handler) the selector reports
        self.deadlines = []
        self.resolved = collections.deque()
        self.resolver = Resolver(self._resolved)
        self.pipes = PipePool()
        self.stopping = False
        self.accept_paused_until = None
        self.waker = Waker()

    @property
    def stats(self):
        return self.log.stats

    # -- setup ------------------------------------------------------------------------------

    def start(self):
        """Open the log and every listener; on any failure release what was opened and raise."""
        try:
            if self.log_path:
                self.log.open(self.log_path)
            for spec in self.listen_specs:
                try:
                    if spec in self.handed:
                        listener = self.handed.pop(spec)
                        listener.setblocking(False)
                        self.addresses.append(spec)
                    elif "/" in spec:
                        listener = listen_unix(spec, self.owned_paths)
                        self.addresses.append(spec)
                    else:
                        listener, address = listen_tcp(spec)
                        self.addresses.append(address)
                except OSError as error:
                    raise OSError(f"cannot listen on {spec}: {error.strerror or error}") from None
                self.listeners.append(listener)
            self.waker.open()
        except Exception:
            self._release()
            raise
        self.selector.register(self.waker.read_fd, selectors.EVENT_READ, self._drain_wake)
        self._watch_listeners()
        return self.addresses

    def _watch_listeners(self):
        for listener in self.listeners:
            self.selector.register(listener, selectors.EVENT_READ,
                                   functools.partial(self._accept, listener))

    # -- the loop ---------------------------------------------------------------------------

    def serve_forever(self):
        try:
            while not self.stopping:
                for key, events in self.selector.select(self._next_timeout()):
                    key.data(events)
                self._run_deadlines()
        finally:
            self._cleanup()

    def shutdown(self):
        """Ask serve_forever() to stop; safe from other threads and from signal handlers
        (which is why it takes no lock: the handler may interrupt a holder of it)."""
        self.stopping = True
        self.waker.wake()

    def _drain_wake(self, events):
        self.waker.drain()
        while self.resolved:
            connection, addresses, error = self.resolved.popleft()
            connection.on_resolved(addresses, error)

    def _accept(self, listener, events):
        for _ in range(64):
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting()
                return
            if len(self.connections) >= self.max_connections and self.idle:
                next(iter(self.idle)).close()
            active = len(self.connections)
            if active >= self.max_connections + OVERFLOW_CONNECTIONS:
                client.close()
                self.log.count_denied("(connection limit)")
                continue
            client.setblocking(False)
            connection = Connection(self, client, next(self.ids),
                                    refusing=active >= self.max_connections)
            self.connections[connection.id] = connection
            self.idle[connection] = None
            self.set_deadline(connection, HANDSHAKE_TIMEOUT)
            self.watch(client, selectors.EVENT_READ, connection.on_client_event)

    def _pause_accepting(self):
        for listener in self.listeners:
            self.selector.unregister(listener)
        self.accept_paused_until = time.monotonic() + ACCEPT_BACKOFF

    def _next_timeout(self):
        now = time.monotonic()
        timeout = 1.0
        if self.deadlines:
            timeout = min(timeout, self.deadlines[0][0] - now)
        if self.accept_paused_until is not None:
            timeout = min(timeout, self.accept_paused_until - now)
        return max(timeout, 0)

    def _run_deadlines(self):
        now = time.monotonic()
        if self.accept_paused_until is not None and now >= self.accept_paused_until:
            self.accept_paused_until = None
            self._watch_listeners()
        while self.deadlines and self.deadlines[0][0] <= now:
            deadline, connection_id = heapq.heappop(self.deadlines)
            connection = self.connections.get(connection_id)
            if connection is not None and connection.deadline == deadline:
                connection.deadline = None
                connection.on_timeout()

    # -- what connections use ---------------------------------------------------------------

    def set_deadline(self, connection, seconds):
        connection.deadline = time.monotonic() + seconds
        heapq.heappush(self.deadlines, (connection.deadline, connection.id))

    def clear_deadline(self, connection):
        connection.deadline = None

    def watch(self, sock, events, handler):
        """Register, modify or unregister `sock` so that the selector reports exactly `events`,
        to handler(events)."""
        current = self.registered.get(sock)
        if current is not None and current[0] == events and current[1] == handler:
            return
        if not events:
            self.unwatch(sock)
        elif current is None:
            self.selector.register(sock, events, handler)
            self.registered[sock] = (events, handler)
        else:
            self.selector.modify(sock, events, handler)
            self.registered[sock] = (events, handler)

    def unwatch(self, sock):
        if self.registered.pop(sock, None) is not None:
            self.selector.unregister(sock)

    def mark_idle(self, connection):
        """The newest of the idle: at the limit the oldest idle connection makes room."""
        self.idle.pop(connection, None)
        self.idle[connection] = None

    def mark_busy(self, connection):
        self.idle.pop(connection, None)

    def forget(self, connection):
        self.connections.pop(connection.id, None)
        self.idle.pop(connection, None)

    def resolve(self, connection, name, port):
        self.resolver.submit(connection, name, port)

    def accepts(self, password):
        return password_matches(self.token, password)

    def _resolved(self, connection, addresses, error):
        """Called on a resolver thread: hand the answer to the loop and wake it."""
        self.resolved.append((connection, addresses, error))
        self.waker.wake_from_thread()

    # -- cleanup ----------------------------------------------------------------------------

    def _close_listeners(self):
        for listener in [*self.listeners, *self.handed.values()]:
            listener.close()
        self.listeners, self.handed = [], {}
        for path, inode in self.owned_paths:
            try:
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)
            except OSError:
                pass
        self.owned_paths = []

    def _cleanup(self):
        for connection in list(self.connections.values()):
            connection.close(PROXY_STOPPED)
        self._release()

    def _release(self):
        self._close_listeners()
        self.pipes.close()
        self.resolver.stop()
        self.selector.close()
        self.log.close()
        self.waker.close()


class Waker:
    """A pipe that wakes the selector loop: from the resolver threads, which hold the lock
    while they write so that close() never lets them write to a number reused by another
    file, and from signal handlers, which must not take it (they may interrupt a holder)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.read_fd = self.write_fd = None

    def open(self):
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)

    def wake(self):
        fd = self.write_fd
        if fd is not None:
            try:
                os.write(fd, b"x")
            except OSError:
                pass

    def wake_from_thread(self):
        with self.lock:
            self.wake()

    def drain(self):
        try:
            while os.read(self.read_fd, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def close(self):
        with self.lock:
            fds, self.read_fd, self.write_fd = (self.read_fd, self.write_fd), None, None
        for fd in fds:
            if fd is not None:
                os.close(fd)


class Resolver:
    """Looks names up on a few daemon threads, so the loop never waits for DNS and a resolver
    that does not answer cannot hold the process when it exits."""

    def __init__(self, deliver, workers=DNS_WORKERS):
        self.deliver, self.workers = deliver, workers
        self.requests = queue.SimpleQueue()
        self.threads = []

    def submit(self, connection, name, port):
        if len(self.threads) < self.workers:
            thread = threading.Thread(target=self._work, name="lookup", daemon=True)
            thread.start()
            self.threads.append(thread)
        self.requests.put((connection, name, port))

    def _work(self):
        while True:
            item = self.requests.get()
            if item is None:
                return
            connection, name, port = item
            if connection.closed:
                continue
            try:
                self.deliver(connection, lookup(name, port), None)
            except (OSError, UnicodeError, ValueError) as error:
                self.deliver(connection, None, error)

    def stop(self):
        for _ in self.threads:
            self.requests.put(None)
        self.threads = []


def lookup(name, port):
    """Resolve a name once (in a pool thread); return the unique addresses in the order given."""
    results = socket.getaddrinfo(name, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
    addresses = []
    for family, _, _, _, sockaddr in results:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = ipaddress.ip_address(sockaddr[0].split("%")[0])
            if address.version == 6 and address.ipv4_mapped:
                address = address.ipv4_mapped
            if address not in addresses:
                addresses.append(address)
    return addresses


def parse_listen_address(text):
    """Split a TCP listen address "HOST:PORT" or "[V6]:PORT"; raise ValueError saying why."""
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen address {text!r} is neither a unix socket path (with a '/') "
                         f"nor HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"listen address {text!r}: host must be an IP address") from None
    return host, int(port)


def listen_tcp(spec):
    """A listening non-blocking TCP socket on "HOST:PORT", and the address it got (port 0
    picks a free one)."""
    host, port = parse_listen_address(spec)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    bound_host, bound_port = listener.getsockname()[:2]
    return listener, (f"[{bound_host}]:{bound_port}" if family == socket.AF_INET6
                      else f"{bound_host}:{bound_port}")


def listen_unix(path, owned_paths):
    """A listening non-blocking unix socket at `path`, mode 600. An existing file there is
    replaced only when it is a socket nobody answers on; (path, inode) goes to owned_paths as
    soon as the socket exists, so that it is removed at exit (if it is still ours)."""
    if len(os.fsencode(path)) > 107:
        raise ValueError(f"unix socket path is too long (over 107 bytes): {path}")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISSOCK(info.st_mode):
            raise ValueError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise ValueError(f"{path} is in use by another running proxy")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_mask = os.umask(0o177)
    try:
        listener.bind(path)
    except OSError:
        listener.close()
        raise
    finally:
        os.umask(old_mask)
    os.chmod(path, 0o600)
    owned_paths.append((path, os.lstat(path).st_ino))
    listener.listen(1024)
    listener.setblocking(False)
    return listener


def handed_listener(fd, specs):
    """{path: socket} for --listen-fd FD: the socket on FD must be a unix stream socket
    listening on one of the --listen paths (`specs`); raise UsageError otherwise, having
    closed nothing but what it made.  The caller bound it and removes its path."""
    try:
        listener = socket.socket(fileno=os.dup(fd))
    except OSError as error:
        raise UsageError(f"--listen-fd {fd}: not a socket ({error.strerror or error})") from None
    try:
        listening = (listener.family == socket.AF_UNIX and listener.type == socket.SOCK_STREAM
                     and listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        path = listener.getsockname() if listening else None
    except OSError:
        listening, path = False, None
    if not listening or path not in specs or "/" not in path:
        listener.close()
        raise UsageError(f"--listen-fd {fd} is not a unix socket listening on a --listen path")
    os.close(fd)
    return {path: listener}


# ---------------------------------------------------------------------------------------------
# Command line

def help_formatter(prog):
    """argparse's HelpFormatter at the terminal's width, found as shutil finds it (COLUMNS,
    then stdout's terminal, else 80) without importing shutil (~3 ms of the proxy's start:
    argparse makes a formatter at every add_argument, for a help rarely printed)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return argparse.HelpFormatter(prog, width=(columns if columns > 0 else 80) - 2)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="socks_filter.py", formatter_class=help_formatter,
        description="A filtering SOCKS5/SOCKS4a/HTTP proxy that lets connections through only to "
                    "allowed destinations. See the module docstring for the full manual.",
        epilog="example: socks_filter.py --listen /tmp/p.sock --allow api.anthropic.com "
               "--allow '*.githubusercontent.com:443' --log p.jsonl")
    parser.add_argument("--listen", action="append", required=True, metavar="ADDR",
                        help="unix socket path (contains a '/') or HOST:PORT; repeatable; "
                             "port 0 picks a free port")
    parser.add_argument("--allow", action="append", default=[], metavar="RULE",
                        help="allow a destination: name, *.name, IP or [IPv6], network, with "
                             "optional :PORT; a name's tunnels must be TLS naming it, unless the "
                             "rule ends in :PORT/raw (any protocol, e.g. github.com:22/raw)")
    parser.add_argument("--deny", action="append", default=[], metavar="RULE",
                        help="deny a destination (wins over --allow); may be broad: *:22, "
                             "*.com, [fc00::]/7, 0.0.0.0/0")
    parser.add_argument("--allow-file", action="append", default=[], metavar="FILE",
                        help="read allow rules from FILE, one per line, '#' comments")
    parser.add_argument("--allow-private", action="store_true",
                        help="let allowed names resolve to private-use addresses (10/8, "
                             "172.16/12, 192.168/16, fc00::/7); loopback, link-local, CGNAT and "
                             "the rest still need an IP rule, cloud platform endpoints an exact one")
    parser.add_argument("--mode", choices=("enforce", "audit"), default="enforce",
                        help="audit: let through what passes the name and address checks and "
                             "log what enforce would decide (default: enforce)")
    parser.add_argument("--log", metavar="FILE", help="append one JSON object per decision and close")
    parser.add_argument("--listen-fd", type=int, metavar="FD",
                        help="serve the unix socket on this file descriptor, which the caller "
                             "bound to one of the --listen paths and made listen, rather than "
                             "binding that path (the caller removes it)")
    parser.add_argument("--ready-fd", type=int, metavar="FD",
                        help="write 'ready ADDR...' to this file descriptor once listening")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                        help=f"simultaneous connections served (default {DEFAULT_MAX_CONNECTIONS})")
    parser.add_argument("--no-sni-check", dest="sni_check", action="store_false",
                        help="let tunnels to names carry anything (no TLS ClientHello and server "
                             "name check; for benchmarks)")
    parser.add_argument("--token-env", metavar="VAR",
                        help="serve only clients whose proxy password is the value of the "
                             "environment variable VAR (HTTP Basic, SOCKS5 RFC 1929; SOCKS4 is "
                             "refused)")
    parser.add_argument("--verbose", action="store_true", help="a human line per decision on stderr")
    parser.error = functools.partial(one_line_error, parser)
    return parser


class UsageError(Exception):
    """A command-line value argparse cannot check by itself."""


def one_line_error(parser, message):
    """argparse's error(), in one line rather than the usage block."""
    parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")


def own_addresses():
    """This machine's interface addresses, read from /proc once at start (no privileges, well
    under a millisecond). A name resolving to one reaches the services listening on this host,
    so the policy treats them like loopback. Addresses added later (a VPN coming up) are not
    seen; a file that cannot be read adds nothing, and the other checks still hold."""
    found = set()
    for path, parse in (("/proc/net/if_inet6", _inet6_addresses), ("/proc/net/fib_trie", _local_ipv4)):
        try:
            with open(path, encoding="ascii") as handle:
                found.update(parse(handle))
        except (OSError, ValueError, IndexError):
            pass
    return frozenset(found)


def _inet6_addresses(lines):
    return [ipaddress.IPv6Address(int(line.split()[0], 16)) for line in lines if line.strip()]


def _local_ipv4(lines):
    """The "/32 host LOCAL" leaves of the kernel's routing trie: one per local IPv4 address."""
    found, last = [], None
    for line in lines:
        words = line.split()
        if words[:1] == ["|--"]:
            last = words[1]
        elif words[:3] == ["/32", "host", "LOCAL"] and last:
            found.append(ipaddress.IPv4Address(last))
    return found


def policy_from_args(args):
    allow = [parse_rule(text) for text in args.allow]
    for path in args.allow_file:
        allow.extend(read_rule_file(path))
    deny = [parse_rule(text, deny=True) for text in args.deny]
    return Policy(allow, deny, allow_private=args.allow_private, mode=args.mode, own=own_addresses())


def token_from_env(name):
    """The --token-env secret as bytes (None without the option), taken out of the environment."""
    if name is None:
        return None
    value = os.environ.pop(name, "")
    if not value:
        raise UsageError(f"--token-env {name}: the variable is not set or empty")
    return os.fsencode(value)


def exit_with_parent(parent=None):
    """Ask the kernel to send SIGTERM when the parent dies; exit now if it already has
    (`parent`: the pid it had at start, when that was before this was asked)."""
    parent = parent or os.getppid()
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        sys.exit(0)


def raise_fd_limit():
    """Raise the soft limit on open files towards the hard one (each relay holds
    DESCRIPTORS_PER_RELAY); return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return wanted if soft == resource.RLIM_INFINITY else soft


def affordable_connections(wanted, fd_limit, reserve=OVERFLOW_CONNECTIONS + 32):
    """The connection limit that the descriptor limit can really carry."""
    return max(1, min(wanted, (fd_limit - reserve) // DESCRIPTORS_PER_RELAY))


def announce_ready(addresses, ready_fd):
    """Write "ready ADDR..." to ready_fd (then close it) or to stdout; paths as raw bytes."""
    line = os.fsencode("ready " + " ".join(addresses) + "\n")
    if ready_fd is None:
        sys.stdout.buffer.write(line)
        sys.stdout.flush()
        return
    try:
        os.write(ready_fd, line)
    finally:
        os.close(ready_fd)


def main(argv=None, parent=None):
    """The daemon; `parent`: the process it dies with (by default, its parent now)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    name = parser.prog
    try:
        if args.max_connections < 1:
            raise UsageError("--max-connections must be at least 1")
        if args.ready_fd is not None:
            try:
                os.fstat(args.ready_fd)
            except OSError:
                raise UsageError(f"--ready-fd {args.ready_fd} is not an open file descriptor") from None
        for spec in args.listen:
            if "/" not in spec:
                parse_listen_address(spec)
        policy = policy_from_args(args)
        token = token_from_env(args.token_env)
        handed = {} if args.listen_fd is None else handed_listener(args.listen_fd, args.listen)
    except (RuleError, UsageError, ValueError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    exit_with_parent(parent)
    max_connections = affordable_connections(args.max_connections, raise_fd_limit())
    if max_connections < args.max_connections and args.verbose:
        print(f"{name}: the open-file limit allows {max_connections} connections, not "
              f"{args.max_connections}", file=sys.stderr)
    server = FilterServer(policy, args.listen, log_path=args.log, verbose=args.verbose,
                          max_connections=max_connections, sni_check=args.sni_check, token=token,
                          handed=handed)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: server.shutdown())
    try:
        addresses = server.start()
    except (OSError, ValueError) as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    try:
        announce_ready(addresses, args.ready_fd)
    except OSError as error:
        server.shutdown()
        server.serve_forever()
        print(f"{name}: error: cannot write the ready line: {error}", file=sys.stderr)
        return 1
    server.serve_forever()
    print(server.log.summary(), file=sys.stderr, flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Started before its arguments are known: a parent starts the interpreter early (Python's own
# start overlaps the parent's work) and hands it the arguments, on stdin, when it needs the
# proxy; this module is imported then, and main_from_stdin reads them.

def main_from_stdin(parent=None):
    """main() with its arguments read from stdin up to EOF: their count, then each, all
    ended by a NUL, the first being the file stderr goes to (created, never through a
    link); once main() has run, the process exits there (os._exit).  An empty stdin (the
    parent gave up): 0 at once, never listening; fewer than counted, or one not ended (cut
    short: the parent was interrupted while writing, and a list or a rule cut short is
    another): refused, 2.
    stdin may be a unix socket: a descriptor sent with the arguments (SCM_RIGHTS; bw_lib
    sends the proxy's listening socket) becomes descriptor 0 once they are read, so the
    arguments name it as --listen-fd 0.  `parent`: the parent's pid as the process first
    saw it (the proxy exits when the parent is gone), noted now when not given."""
    parent = parent or os.getppid()     # the wrapper, before it has time to die
    data, fds = read_arguments(0)
    count, *items = data.split(b"\0")[:-1] or [b""]
    if not (data.endswith(b"\0") and count.isdigit() and int(count) == len(items) > 0):
        for fd in fds:
            os.close(fd)
        if data:
            print("socks_filter.py: error: the arguments on stdin were cut short",
                  file=sys.stderr)
        return 2 if data else 0
    err = os.open(items[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600)
    os.dup2(err, 2)
    os.close(err)
    if len(fds) > 1:
        print(f"socks_filter.py: error: {len(fds)} descriptors came with the arguments, not one",
              file=sys.stderr)
        code = 2
    else:
        for fd in fds:
            os.dup2(fd, 0, inheritable=False)
            os.close(fd)
        code = main([os.fsdecode(item) for item in items[1:]], parent=parent)
    # Once served, the process ends without the interpreter's teardown (~8 ms of freeing
    # modules and threads): the parent waits for this exit before its summary.  Everything
    # is closed by now (the log in FilterServer._release); the standard streams are flushed.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


MAX_DESCRIPTORS_HANDED = 4


def read_arguments(fd):
    """(everything read from fd up to EOF, [descriptors that came with it]): fd is a pipe or
    a unix socket (which may carry descriptors, SCM_RIGHTS, received close-on-exec).  A
    message whose descriptors did not all fit is refused (OSError), those that did closed."""
    try:
        channel = socket.socket(fileno=os.dup(fd))
    except OSError:                 # not a socket (ENOTSOCK): a pipe or a file
        with open(fd, "rb", closefd=False) as f:
            return f.read(), []
    chunks, fds = [], []
    space = socket.CMSG_SPACE(MAX_DESCRIPTORS_HANDED * struct.calcsize("i"))
    with channel:
        while True:
            chunk, ancillary, flags, _ = channel.recvmsg(1 << 16, space, socket.MSG_CMSG_CLOEXEC)
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % struct.calcsize("i")
                    fds += struct.unpack(f"{usable // struct.calcsize('i')}i", payload[:usable])
            if flags & socket.MSG_CTRUNC:
                for handed in fds:
                    os.close(handed)
                raise OSError("more descriptors came with the arguments than it takes")
            if not chunk:
                return b"".join(chunks), fds
            chunks.append(chunk)


if __name__ == "__main__":
    sys.exit(main())
