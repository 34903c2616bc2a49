"""
Who is calling, according to the kernel.

On a Unix socket the kernel hands over the caller's credentials
(``SO_PEERCRED``). On loopback TCP it does not, but it tells the owner's
uid of any TCP socket named by its four-tuple: the caller's own socket
is the one whose local address is the caller's address and whose remote
address is ours. It is asked over sock_diag netlink, a hash lookup of
tens of microseconds; where netlink is unavailable (a seccomp filter, a
kernel built without it) the same socket is looked for in
``/proc/net/tcp`` and ``/proc/net/tcp6``, which takes milliseconds.

Both answers name the uid that *created* the socket (at ``socket()`` for
TCP, at ``connect()`` for Unix sockets), not whoever holds it now: a
socket passed to another process keeps its creator's uid.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import re
import socket
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_Endpoint = tuple[IPAddress, int]

# struct ucred from <sys/socket.h>: pid_t pid, uid_t uid, gid_t gid.
_UCRED: Final = struct.Struct("=iII")

# The kernel's "no such id" (the overflow value it reports for a socket
# that has no peer).
_NO_ID: Final = 0xFFFFFFFF

# One line of /proc/net/tcp{,6}: "sl: local rem st tx:rx tr:when retrnsmt
# uid ...". Addresses are 8 (IPv4) or 32 (IPv6) hex digits, which the
# kernel prints as native-endian 32-bit words, and ports plain 16-bit
# numbers, all in upper case (%08X, %04X). Only spaces and tabs separate
# fields, so a match never runs into the next line and a malformed line
# is simply not matched.
_ADDRESS: Final = r"[0-9A-F]{32}|[0-9A-F]{8}"
_PORT: Final = r"[0-9A-F]{4}"
_ENTRY_LINE: Final = re.compile(
    r"^[ \t]*[0-9]+:"
    rf"[ \t]+(?P<local>{_ADDRESS}):(?P<local_port>{_PORT})"
    rf"[ \t]+(?P<remote>{_ADDRESS}):(?P<remote_port>{_PORT})"
    r"[ \t]+(?P<state>[0-9A-F]{2})"
    r"[ \t]+\S+[ \t]+\S+[ \t]+\S+"
    r"[ \t]+(?P<uid>[0-9]{1,10})(?=[ \t]|$)",
    re.MULTILINE | re.ASCII,
)

# TCP states (include/net/tcp_states.h) in which the entry is a full
# socket still carrying its creator's uid: open, or closing after a
# request was sent (a client that shut down writing sits in FIN_WAIT1/2).
# TIME_WAIT is left out on purpose: the kernel lists those minisockets
# with uid 0, which would pass any closed connection off as root's.
# LISTEN, SYN_SENT, SYN_RECV, NEW_SYN_RECV and CLOSE cannot be the client
# end of a connection the server has accepted.
TCP_ESTABLISHED: Final = 0x01
TCP_FIN_WAIT1: Final = 0x04
TCP_FIN_WAIT2: Final = 0x05
TCP_TIME_WAIT: Final = 0x06
TCP_CLOSE_WAIT: Final = 0x08
TCP_LAST_ACK: Final = 0x09
TCP_CLOSING: Final = 0x0B
OWNED_STATES: Final = frozenset(
    {
        TCP_ESTABLISHED,
        TCP_FIN_WAIT1,
        TCP_FIN_WAIT2,
        TCP_CLOSE_WAIT,
        TCP_LAST_ACK,
        TCP_CLOSING,
    }
)

# sock_diag, from <linux/netlink.h>, <linux/sock_diag.h> and
# <linux/inet_diag.h>; the socket module has AF_NETLINK but none of these.
_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLMSG_ERROR: Final = 2
_NLM_F_REQUEST: Final = 0x01
_INET_DIAG_NOCOOKIE: Final = b"\xff" * 8
_OWNED_STATES_MASK: Final = sum(1 << state for state in OWNED_STATES)

# struct nlmsghdr (length, type, flags, sequence, port id), then struct
# inet_diag_req_v2 (family, protocol, extensions, pad, states) and its
# struct inet_diag_sockid: ports and addresses in network order, here as
# bytes, then the interface index and the cookie.
_NLMSG_HEADER: Final = struct.Struct("=IHHII")
_DIAG_REQUEST: Final = struct.Struct("=IHHII BBxxI 2s2s16s16sI8s")
# struct nlmsgerr opens with the negated errno.
_NLMSG_ERRNO: Final = struct.Struct("=i")
# struct inet_diag_msg up to idiag_uid: family, state, timer, retransmits,
# the sockid, then expires, rqueue and wqueue. Attributes may follow.
_DIAG_MESSAGE: Final = struct.Struct("=BBxx 2s2s16s16s 12x 12x I")

# The kernel answers before send() returns; the timeout only bounds a
# reply that never comes.
_SOCK_DIAG_TIMEOUT_SECONDS: Final = 0.5
_REPLY_BUFFER_BYTES: Final = 8192


@dataclass(frozen=True, slots=True)
class Peer:
    """
    The process on the other end of a connection, as the kernel knows it.

    ``gid``, ``pid`` and ``groups`` (the supplementary groups) are known
    on Unix sockets only; on TCP they are ``None`` and empty.
    """

    uid: int
    gid: int | None
    pid: int | None
    groups: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SocketEntry:
    """
    One socket from ``/proc/net/tcp`` or ``/proc/net/tcp6``, or from a
    sock_diag reply.

    IPv4-mapped IPv6 addresses are unmapped to IPv4, so that one
    connection compares equal whichever table lists it.
    """

    local_address: IPAddress
    local_port: int
    remote_address: IPAddress
    remote_port: int
    state: int
    uid: int


#: Not in the socket module; the Linux value, from asm-generic/socket.h.
_SO_PEERGROUPS = 59

#: Python's getsockopt takes at most 1024 bytes, room for 256 groups.
# Limitation: a caller in more than 256 groups gets none from the kernel
# (it refuses rather than truncates); the group database still counts.
_MAX_PEER_GROUPS = 256


def peer_of_unix_socket(sock: socket.socket) -> Peer | None:
    """
    SO_PEERCRED of a connected AF_UNIX socket; None if unavailable.

    The credentials are the peer's at ``connect()`` (or
    ``socketpair()``) time. asyncio's transport sockets work too. Returns
    ``None`` for other families, for an unconnected or closed socket and
    on platforms without ``SO_PEERCRED``.
    """
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None or sock.family != socket.AF_UNIX:
        return None

    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size)
        pid, uid, gid = _UCRED.unpack(raw)
    except (OSError, struct.error):
        return None

    # An unconnected socket answers pid 0 and the overflow ids rather
    # than an error.
    if pid <= 0 or uid == _NO_ID or gid == _NO_ID:
        return None

    return Peer(uid=uid, gid=gid, pid=pid, groups=_peer_groups(sock))


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    # SO_PEERGROUPS (Linux 4.13) carries the groups the peer had at
    # connect time, which no user database may know (a container's uid).
    try:
        raw = sock.getsockopt(
            socket.SOL_SOCKET, _SO_PEERGROUPS, _MAX_PEER_GROUPS * 4
        )
    except OSError:
        return ()
    count = len(raw) // 4

    return struct.unpack(f"={count}I", raw[: count * 4])


def open_sock_diag() -> socket.socket:
    """
    A netlink socket to the kernel's sock_diag, for ``peer_of_tcp``.

    Raises OSError where netlink is unavailable: EPERM, EAFNOSUPPORT or
    EPROTONOSUPPORT under a seccomp filter or on a kernel without it.
    """
    family = getattr(socket, "AF_NETLINK", None)
    if family is None:  # pragma: no cover -- AF_NETLINK is Linux only
        raise OSError(errno.EAFNOSUPPORT, "no AF_NETLINK on this platform")

    sock = socket.socket(family, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG)
    try:
        sock.settimeout(_SOCK_DIAG_TIMEOUT_SECONDS)
        # Connected to the kernel (port id 0), the socket refuses
        # messages from any other sender.
        sock.connect((0, 0))
    except OSError:  # pragma: no cover -- fails only out of memory
        sock.close()
        raise

    return sock


def peer_of_tcp(
    server: tuple[str, int],
    client: tuple[str, int],
    proc_net: Path = Path("/proc/net"),
    *,
    sock_diag: Callable[[], socket.socket] | None = open_sock_diag,
) -> Peer | None:
    """
    The uid owning the client end of a loopback TCP connection; None
    when the kernel has no such socket in ``OWNED_STATES``.

    ``server`` is our end (the transport's ``sockname``), ``client`` the
    caller's (``peername``); IPv6 4-tuples are accepted as they come and
    only host and port are used. The kernel is asked over the netlink
    socket that ``sock_diag`` opens, and its "no such socket" is final.
    Only when netlink can't answer (the socket can't be opened, or the
    kernel errs or says nothing) are the tables ``tcp`` and ``tcp6`` in
    ``proc_net`` read instead; ``sock_diag=None`` reads them at once.

    Bad addresses give ``None``; this never raises. It blocks for tens
    of microseconds over netlink, and for about 2 ms per table read on
    a host with a 262144-bucket connection hash.
    """
    try:
        server_end = _endpoint_of(server)
        client_end = _endpoint_of(client)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None

    if sock_diag is not None:
        # OSError means that netlink can't answer here; the tables can.
        with contextlib.suppress(OSError):
            return _tcp_peer(
                _owner_by_sock_diag(sock_diag, client_end, server_end)
            )

    return _tcp_peer(_owner_in_tables(proc_net, client_end, server_end))


def parse_diag_reply(reply: bytes, seq: int) -> SocketEntry | None:
    """
    The socket in the kernel's reply to sock_diag request number
    ``seq``; None if the kernel has no such socket (ENOENT).

    IPv4-mapped IPv6 addresses are unmapped, as in ``SocketEntry``.
    Raises OSError with the kernel's errno for any other error it
    reports, and with EBADMSG for a reply that is malformed or that
    answers another request.
    """
    if len(reply) < _NLMSG_HEADER.size:
        raise _bad_reply("is shorter than a netlink header")
    length, kind, _, reply_seq, _ = _NLMSG_HEADER.unpack_from(reply)
    if reply_seq != seq:
        raise _bad_reply(f"answers request {reply_seq}, not {seq}")
    if length > len(reply):
        raise _bad_reply(f"is cut short at {len(reply)} of {length} bytes")
    body = reply[_NLMSG_HEADER.size : length]

    if kind == _NLMSG_ERROR and len(body) >= _NLMSG_ERRNO.size:
        (code,) = _NLMSG_ERRNO.unpack_from(body)
        if code == -errno.ENOENT:
            return None
        # Zero would be an acknowledgement, which was not asked for.
        if code < 0:
            raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
    elif kind == _SOCK_DIAG_BY_FAMILY and len(body) >= _DIAG_MESSAGE.size:
        return _diag_entry(body)

    raise _bad_reply(f"is of type {kind} and {len(body)} bytes")


def _owner_by_sock_diag(
    sock_diag: Callable[[], socket.socket],
    client: _Endpoint,
    server: _Endpoint,
) -> int | None:
    """
    The uid of the owned socket from client to server, as sock_diag
    lists it; None if there is none. Raises OSError if it can't answer.
    """
    with sock_diag() as sock:
        entry = _ask_sock_diag(sock, 1, client, server)
        # A kernel whose tcp_diag can't be loaded says ENOENT to every
        # request. While we serve, our end of the connection is listed
        # (or, once closed, the listener the kernel's lookup falls back
        # to), so any answer for it shows that the ENOENT was meant.
        if entry is None and _ask_sock_diag(sock, 2, server, client) is None:
            raise OSError(errno.ENOENT, "sock_diag lists no TCP socket")

    # For a four-tuple with no connection the kernel answers with a
    # listener on the local address and port if there is one; TIME_WAIT
    # remains answer with uid 0. Only the socket itself, owned, counts.
    if entry is None or not _is_owned_socket(entry, client, server):
        return None

    return entry.uid


def _ask_sock_diag(
    sock: socket.socket, seq: int, local: _Endpoint, remote: _Endpoint
) -> SocketEntry | None:
    """
    The socket sock_diag finds for a four-tuple, as ``parse_diag_reply``
    gives it; raises OSError when there is no usable answer.
    """
    sock.send(_diag_request(seq, local, remote))

    return parse_diag_reply(sock.recv(_REPLY_BUFFER_BYTES), seq)


def _diag_request(seq: int, local: _Endpoint, remote: _Endpoint) -> bytes:
    """
    A sock_diag request for the one TCP socket from local to remote.
    """
    # Without NLM_F_DUMP the kernel looks the four-tuple up in its hash
    # and ignores the states mask, so the reply's state is checked. An
    # AF_INET lookup also finds an AF_INET6 socket connected to a
    # v4-mapped address, since both are hashed by their IPv4 addresses;
    # a second request in AF_INET6 could find nothing more.
    family = socket.AF_INET if local[0].version == 4 else socket.AF_INET6

    return _DIAG_REQUEST.pack(
        _DIAG_REQUEST.size,
        _SOCK_DIAG_BY_FAMILY,
        _NLM_F_REQUEST,
        seq,
        0,
        family,
        socket.IPPROTO_TCP,
        _OWNED_STATES_MASK,
        local[1].to_bytes(2, "big"),
        remote[1].to_bytes(2, "big"),
        local[0].packed,
        remote[0].packed,
        0,
        _INET_DIAG_NOCOOKIE,
    )


def _diag_entry(body: bytes) -> SocketEntry:
    """
    The socket described by an ``inet_diag_msg``.
    """
    family, state, sport, dport, src, dst, uid = _DIAG_MESSAGE.unpack_from(
        body
    )

    # The family is the socket's, which can be AF_INET6 with v4-mapped
    # addresses for an AF_INET request.
    return SocketEntry(
        local_address=_diag_address(family, src),
        local_port=int.from_bytes(sport, "big"),
        remote_address=_diag_address(family, dst),
        remote_port=int.from_bytes(dport, "big"),
        state=state,
        uid=uid,
    )


def _diag_address(family: int, packed: bytes) -> IPAddress:
    """
    An address from an ``inet_diag_sockid``, unmapped to IPv4.
    """
    if family == socket.AF_INET:
        return ipaddress.IPv4Address(packed[:4])
    if family == socket.AF_INET6:
        return _unmapped(ipaddress.IPv6Address(packed))

    raise _bad_reply(f"names address family {family}")


def _bad_reply(what: str) -> OSError:
    """
    The error for a sock_diag reply that ``what`` makes unusable.
    """
    return OSError(errno.EBADMSG, f"sock_diag reply {what}")


def _owner_in_tables(
    proc_net: Path, client: _Endpoint, server: _Endpoint
) -> int | None:
    """
    The uid of the owned socket from client to server, as
    ``proc_net``'s tables list it; None if there is none.
    """
    # A v4 connection can be listed in either table: tcp6 holds it as
    # ::ffff:a.b.c.d when the client used an AF_INET6 socket.
    tables = ("tcp", "tcp6") if client[0].version == 4 else ("tcp6",)

    # Limitation: rendering a table walks every bucket of the kernel's
    # connection hash, however few sockets there are, so each read costs
    # milliseconds on a large host, and concurrent lookups queue behind
    # each other. Only this fallback pays it, where netlink is refused;
    # allowing socket(AF_NETLINK, ..., NETLINK_SOCK_DIAG) lifts it.
    for table in tables:
        text = _read_table(proc_net / table)
        if text is None:
            continue
        uid = _find_owner(text, client, server)
        if uid is not None:
            return uid

    return None


def _tcp_peer(uid: int | None) -> Peer | None:
    """
    The peer of a TCP connection whose client end ``uid`` owns.
    """
    # Limitation: the pid is not resolved on TCP; finding it means
    # scanning every /proc/<pid>/fd for the socket's inode, a cost per
    # request that grows with every process on the host. Callers that
    # need the pid should listen on a Unix socket instead.
    return None if uid is None else Peer(uid=uid, gid=None, pid=None)


def parse_socket_table(text: str) -> Iterator[SocketEntry]:
    """
    Yield the sockets listed in the text of /proc/net/tcp or tcp6.

    The header and any malformed line are skipped; this never raises.
    """
    for match in _ENTRY_LINE.finditer(text):
        entry = _entry_of(match)
        if entry is not None:
            yield entry


def _find_owner(text: str, local: _Endpoint, remote: _Endpoint) -> int | None:
    """
    The uid of the first owned socket from local to remote in ``text``.
    """
    # Searching the whole text for the port, in C, and parsing only the
    # lines that hold it is an order of magnitude cheaper than running the
    # line pattern over every line.
    needle = f":{local[1]:04X} "
    found = text.find(needle)
    while found != -1:
        line_start = text.rfind("\n", 0, found) + 1
        line_end = text.find("\n", found)
        if line_end == -1:
            line_end = len(text)

        match = _ENTRY_LINE.match(text, line_start, line_end)
        entry = None if match is None else _entry_of(match)
        if entry is not None and _is_owned_socket(entry, local, remote):
            return entry.uid

        found = text.find(needle, line_end)

    return None


def _is_owned_socket(
    entry: SocketEntry, local: _Endpoint, remote: _Endpoint
) -> bool:
    """
    Whether ``entry`` is the socket from local to remote, in a state
    that still carries its creator's uid.
    """
    return (
        entry.local_port == local[1]
        and entry.remote_port == remote[1]
        and entry.state in OWNED_STATES
        and entry.local_address == local[0]
        and entry.remote_address == remote[0]
    )


def _entry_of(match: re.Match[str]) -> SocketEntry | None:
    """
    The entry for one matched line, or None if its fields disagree.
    """
    local, remote = match["local"], match["remote"]
    # Both ends of a socket are of one family.
    if len(local) != len(remote):
        return None

    return SocketEntry(
        local_address=_decode_address(local),
        local_port=int(match["local_port"], 16),
        remote_address=_decode_address(remote),
        remote_port=int(match["remote_port"], 16),
        state=int(match["state"], 16),
        uid=int(match["uid"]),
    )


def _decode_address(hex_digits: str) -> IPAddress:
    """
    The address that the kernel printed as 8 or 32 ``hex_digits``.

    The kernel prints an address as 32-bit words in host byte order
    (127.0.0.1 is ``0100007F`` on little-endian machines), so each word
    is packed back natively to recover the network-order bytes.
    IPv4-mapped IPv6 addresses come back as IPv4.
    """
    words = [
        int(hex_digits[start : start + 8], 16)
        for start in range(0, len(hex_digits), 8)
    ]
    packed = struct.pack(f"={len(words)}I", *words)

    if len(words) == 1:
        return ipaddress.IPv4Address(packed)
    return _unmapped(ipaddress.IPv6Address(packed))


def _endpoint_of(address: tuple[str, int]) -> _Endpoint:
    """
    The address and port of a socket address; raises ValueError (or
    TypeError, IndexError) if it has none.
    """
    port = int(address[1])
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port} out of range")

    return _ip_of(address[0]), port


def _ip_of(host: str) -> IPAddress:
    """
    The address in a socket address's host part, unmapped to IPv4.
    """
    # Loopback addresses carry no zone, and the tables print none.
    address = ipaddress.ip_address(host.partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address):
        return _unmapped(address)

    return address


def _unmapped(address: ipaddress.IPv6Address) -> IPAddress:
    """
    ``address`` as IPv4 if it is IPv4-mapped, else unchanged.
    """
    mapped = address.ipv4_mapped

    return address if mapped is None else mapped


def _read_table(path: Path) -> str | None:
    """
    The whole text of one socket table, or None if it can't be read.
    """
    # Limitation: the kernel renders the table a page at a time, so a
    # socket closing between two reads can shift the rest and make one
    # entry go unlisted; a fallback lookup under heavy churn may then
    # give None. Netlink's lookup by four-tuple has no such gap; reading
    # the table again would narrow it here, at twice the cost.
    try:
        with open(path, encoding="ascii", errors="replace") as table:
            return table.read()
    except OSError:
        return None
