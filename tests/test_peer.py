"""
Tests for sidecar.peer: parsing the kernel's socket tables, and asking
the real kernel who is on the other end of loopback connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.peer import (
    TCP_ESTABLISHED,
    TCP_TIME_WAIT,
    Peer,
    SocketEntry,
    parse_diag_reply,
    parse_socket_table,
    peer_of_tcp,
    peer_of_unix_socket,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Endpoint = tuple[IPAddress, int]

NOBODY = 65534
DECOY_UID = 4242
DEADLINE_SECONDS = 10.0
LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
LOOPBACK_V6 = ipaddress.IPv6Address("::1")

little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little",
    reason="the samples are written as a little-endian kernel prints them",
)

# As a little-endian kernel prints them: 127.0.0.1 is 0100007F, ::1 ends
# in 01000000, ports are big-endian (8080 is 1F90, 40000 is 9C40). The
# sidecar listens on 8080. Listed before the caller's own socket (entry 4,
# uid 1000), on purpose: our accepted end of it (entry 1, uid 0), and two
# sockets sharing the caller's port but connected elsewhere (127.0.0.1
# port 9090 and 127.0.0.2 port 8080).
SAMPLE_TCP = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when"
    " retrnsmt   uid  timeout inode\n"
    "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000"
    " 00000000     0        0 55436 1 0000000000000000 100 0 0 10 0\n"
    "   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000"
    " 00000000     0        0 55440 1 0000000000000000 20 4 30 10 -1\n"
    "   2: 0100007F:9C40 0100007F:2382 01 00000000:00000000 00:00000000"
    " 00000000  2000        0 55441 1 0000000000000000 20 4 30 10 -1\n"
    "   3: 0100007F:9C40 0200007F:1F90 01 00000000:00000000 00:00000000"
    " 00000000  2001        0 55442 1 0000000000000000 20 4 30 10 -1\n"
    "   4: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000"
    " 00000000  1000        0 55439 1 0000000000000000 20 4 30 10 -1\n"
    "   5: 0100007F:9C41 0100007F:1F90 06 00000000:00000000 03:00001681"
    " 00000000     0        0 0 3 0000000000000000\n"
    "   6: 0100007F:9C42 0100007F:1F90 05 00000000:00000000 00:00000000"
    " 00000000  1001        0 0 1 0000000000000000 20 4 30 10 -1\n"
    "   7: 0100007F:9C43 0100007F:1F90 0A 00000000:00000000 00:00000000"
    " 00000000  1002        0 55450 1 0000000000000000 100 0 0 10 0\n"
)
OTHER_LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.2")
SAMPLE_TCP_ENTRIES = [
    SocketEntry(LOOPBACK_V4, 8080, ipaddress.IPv4Address(0), 0, 0x0A, 0),
    SocketEntry(LOOPBACK_V4, 8080, LOOPBACK_V4, 40000, 0x01, 0),
    SocketEntry(LOOPBACK_V4, 40000, LOOPBACK_V4, 9090, 0x01, 2000),
    SocketEntry(LOOPBACK_V4, 40000, OTHER_LOOPBACK_V4, 8080, 0x01, 2001),
    SocketEntry(LOOPBACK_V4, 40000, LOOPBACK_V4, 8080, 0x01, 1000),
    SocketEntry(LOOPBACK_V4, 40001, LOOPBACK_V4, 8080, 0x06, 0),
    SocketEntry(LOOPBACK_V4, 40002, LOOPBACK_V4, 8080, 0x05, 1001),
    SocketEntry(LOOPBACK_V4, 40003, LOOPBACK_V4, 8080, 0x0A, 1002),
]

# ::1 listening on 8080 with a client on 42000 (A410), and a v4 client
# on 42001 (A411) that used an AF_INET6 socket, stored v4-mapped.
SAMPLE_TCP6 = (
    "  sl  local_address                         remote_address"
    "                        st tx_queue rx_queue tr tm->when retrnsmt"
    "   uid  timeout inode\n"
    "   0: 00000000000000000000000001000000:1F90"
    " 00000000000000000000000000000000:0000 0A 00000000:00000000"
    " 00:00000000 00000000     0        0 61001 1 0000000000000000 100 0 0"
    " 10 0\n"
    "   1: 00000000000000000000000001000000:1F90"
    " 00000000000000000000000001000000:A410 01 00000000:00000000"
    " 00:00000000 00000000     0        0 61002 1 0000000000000000 20 4 30"
    " 10 -1\n"
    "   2: 00000000000000000000000001000000:A410"
    " 00000000000000000000000001000000:1F90 01 00000000:00000000"
    " 00:00000000 00000000  1003        0 61003 1 0000000000000000 20 4 30"
    " 10 -1\n"
    "   3: 0000000000000000FFFF00000100007F:A411"
    " 0000000000000000FFFF00000100007F:1F90 01 00000000:00000000"
    " 00:00000000 00000000  1004        0 61004 1 0000000000000000 20 4 30"
    " 10 -1\n"
)
SAMPLE_TCP6_ENTRIES = [
    SocketEntry(LOOPBACK_V6, 8080, ipaddress.IPv6Address(0), 0, 0x0A, 0),
    SocketEntry(LOOPBACK_V6, 8080, LOOPBACK_V6, 42000, 0x01, 0),
    SocketEntry(LOOPBACK_V6, 42000, LOOPBACK_V6, 8080, 0x01, 1003),
    SocketEntry(LOOPBACK_V4, 42001, LOOPBACK_V4, 8080, 0x01, 1004),
]

VALID_LINE = (
    "   7: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000"
    " 00000000  1000        0 55439 1 0000000000000000 20 4 30 10 -1"
)
V6_ADDRESS = "00000000000000000000000001000000"
MALFORMED_LINES = [
    pytest.param("", id="empty"),
    pytest.param("garbage", id="garbage"),
    pytest.param("   7: 0100007F:9C40", id="truncated"),
    pytest.param(VALID_LINE.replace("0100007F:9C", "0100007G:9C"), id="hex"),
    pytest.param(VALID_LINE.replace("0100007F:9C", "0100007:9C"), id="short"),
    pytest.param(VALID_LINE.replace(":9C40", ":9C401"), id="long-port"),
    pytest.param(VALID_LINE.replace("  1000 ", " -1000 "), id="negative"),
    pytest.param(VALID_LINE.replace("  1000 ", " 1e3 "), id="uid-hex"),
    pytest.param(VALID_LINE.replace("  1000 ", " \u0661\u0660 "), id="digits"),
    pytest.param(VALID_LINE.replace("   7:", "   7 "), id="no-slot"),
    pytest.param(VALID_LINE.replace("0100007F", "0100007f"), id="lowercase"),
    pytest.param(
        VALID_LINE.replace("0100007F:1F90", f"{V6_ADDRESS}:1F90"),
        id="mixed-families",
    ),
]

# A client for the other-uid tests, run as nobody under a plain Python:
# it connects, reports each step on stdout, then holds the connection
# until its stdin closes.
CLIENT_CODE = """
import socket, sys
kind, target, half_close = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if kind == "unix":
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(target)
else:
    host, _, port = target.rpartition(":")
    sock = socket.create_connection((host, int(port)))
if half_close:
    sock.shutdown(socket.SHUT_WR)
print("connected", flush=True)
if half_close:
    while sock.recv(1024):
        pass
    print("eof", flush=True)
sys.stdin.read()
"""


def encode_address(address: IPAddress) -> str:
    """
    ``address`` as the kernel prints it: 32-bit words in host order.
    """
    packed = address.packed
    words = [packed[start : start + 4] for start in range(0, len(packed), 4)]

    return "".join(
        f"{int.from_bytes(word, sys.byteorder):08X}" for word in words
    )


def table_line(
    local: Endpoint,
    remote: Endpoint,
    state: int,
    uid: int,
) -> str:
    """
    One line of /proc/net/tcp{,6}, in the kernel's layout.
    """
    local_field = f"{encode_address(local[0])}:{local[1]:04X}"
    remote_field = f"{encode_address(remote[0])}:{remote[1]:04X}"

    return (
        f"   9: {local_field} {remote_field} {state:02X}"
        f" 00000000:00000000 00:00000000 00000000 {uid:5d}"
        "        0 12345 1 0000000000000000 20 4 30 10 -1"
    )


def write_tables(directory: Path, tcp: str, tcp6: str) -> Path:
    """
    Write ``tcp`` and ``tcp6`` where ``peer_of_tcp`` looks for them.
    """
    (directory / "tcp").write_text(tcp)
    (directory / "tcp6").write_text(tcp6)

    return directory


def read_line(child: subprocess.Popen[bytes]) -> str:
    """
    The child's next line of output, waiting at most the deadline.
    """
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], DEADLINE_SECONDS)
    if not ready:
        raise AssertionError(
            f"no output from the client within {DEADLINE_SECONDS} s"
        )
    line = child.stdout.readline().decode().strip()
    if not line:
        _, stderr = child.communicate(timeout=DEADLINE_SECONDS)
        raise AssertionError(f"the client quit: {stderr.decode()}")

    return line


def entries_of_tuple(
    local: tuple[str, int], remote: tuple[str, int]
) -> list[SocketEntry]:
    """
    Every entry the running kernel lists from ``local`` to ``remote``.
    """
    local_ip = ipaddress.ip_address(local[0])
    remote_ip = ipaddress.ip_address(remote[0])
    text = Path("/proc/net/tcp").read_text()

    return [
        entry
        for entry in parse_socket_table(text)
        if (entry.local_address, entry.local_port) == (local_ip, local[1])
        and (entry.remote_address, entry.remote_port) == (remote_ip, remote[1])
    ]


def refused(code: int) -> Callable[[], socket.socket]:
    """
    A sock_diag opener that fails with ``code``, as ``socket()`` does
    where netlink is not allowed.
    """

    def open_refused() -> socket.socket:
        raise OSError(code, os.strerror(code))

    return open_refused


# sock_diag's wire format (linux/netlink.h, linux/inet_diag.h), written
# out here rather than taken from sidecar.peer so that the fake kernel
# checks the module's encoding instead of sharing it.
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x01
# Bits 1 << state for ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE_WAIT,
# LAST_ACK and CLOSING: every owned state, and TIME_WAIT (bit 6) not.
OWNED_STATES_MASK = 0xB32
INET_DIAG_SHUTDOWN = 8
NLMSG_HEADER = struct.Struct("=IHHII")
DIAG_REQUEST = struct.Struct("=IHHII BBBxI 2s2s16s16s I8s")
DIAG_MESSAGE_BODY = struct.Struct("=BBBB 2s2s16s16s I8s IIIII")
NLMSG_ERROR_CODE = struct.Struct("=i")
NLATTR_U8 = struct.Struct("=HHB3x")


def diag_packed(host: str) -> bytes:
    """
    ``host`` as an ``inet_diag_sockid`` holds it: 16 bytes, IPv4 first.
    """
    return ipaddress.ip_address(host).packed.ljust(16, b"\0")


@dataclass(frozen=True)
class DiagRequest:
    """
    One sock_diag request, decoded as the kernel reads it.
    """

    length: int
    kind: int
    flags: int
    family: int
    protocol: int
    extensions: int
    states: int
    sport: int
    dport: int
    src: bytes
    dst: bytes
    interface: int
    cookie: bytes
    seq: int = field(default=0, compare=False)
    raw: bytes = field(default=b"", compare=False, repr=False)

    @classmethod
    def parse(cls, raw: bytes) -> DiagRequest:
        """
        The request in ``raw``, which must be exactly one request long.
        """
        fields = DIAG_REQUEST.unpack(raw)
        length, kind, flags, seq, _, family, protocol, extensions = fields[:8]
        states, sport, dport, src, dst, interface, cookie = fields[8:]

        return cls(
            length=length,
            kind=kind,
            flags=flags,
            family=family,
            protocol=protocol,
            extensions=extensions,
            states=states,
            sport=int.from_bytes(sport, "big"),
            dport=int.from_bytes(dport, "big"),
            src=src,
            dst=dst,
            interface=interface,
            cookie=cookie,
            seq=seq,
            raw=raw,
        )


@dataclass(frozen=True)
class DiagMessage:
    """
    An ``inet_diag_msg`` as the kernel sends it, attributes included.
    """

    seq: int
    family: int
    state: int
    sport: int
    dport: int
    src: bytes
    dst: bytes
    uid: int
    kind: int = SOCK_DIAG_BY_FAMILY
    # The kernel always appends INET_DIAG_SHUTDOWN, padded to 8 bytes.
    attributes: bytes = NLATTR_U8.pack(5, INET_DIAG_SHUTDOWN, 0)

    def encode(self) -> bytes:
        """
        The message in the kernel's layout, netlink header first.
        """
        body = DIAG_MESSAGE_BODY.pack(
            self.family,
            self.state,
            0,
            0,
            self.sport.to_bytes(2, "big"),
            self.dport.to_bytes(2, "big"),
            self.src,
            self.dst,
            0,
            bytes(range(8)),
            0,
            0,
            0,
            self.uid,
            12345,
        )
        length = NLMSG_HEADER.size + len(body) + len(self.attributes)
        header = NLMSG_HEADER.pack(length, self.kind, 0, self.seq, 4242)

        return header + body + self.attributes


#: Builds the bytes the fake kernel sends back for one request.
Answer = Callable[[DiagRequest], bytes]


def answer_socket(uid: int, /, **changes: Any) -> Answer:
    """
    An answer listing the very socket asked for, established and owned
    by ``uid``, with ``changes`` to the fields of its DiagMessage.
    """

    def answer(request: DiagRequest) -> bytes:
        message = DiagMessage(
            seq=request.seq,
            family=request.family,
            state=TCP_ESTABLISHED,
            sport=request.sport,
            dport=request.dport,
            src=request.src,
            dst=request.dst,
            uid=uid,
        )

        return replace(message, **changes).encode()

    return answer


def answer_error(code: int) -> Answer:
    """
    An NLMSG_ERROR answer carrying ``-code`` and the request, as the
    kernel sends it (``code`` 0 is an acknowledgement).
    """

    def answer(request: DiagRequest) -> bytes:
        length = NLMSG_HEADER.size + NLMSG_ERROR_CODE.size + len(request.raw)
        header = NLMSG_HEADER.pack(length, NLMSG_ERROR, 0, request.seq, 4242)

        return header + NLMSG_ERROR_CODE.pack(-code) + request.raw

    return answer


class FakeSockDiag:
    """
    A scripted stand-in for the kernel's sock_diag: each socket it opens
    is one end of a socketpair, whose other end a thread serves, taking
    one request at a time and sending the next answer, then hanging up.
    """

    def __init__(self, answers: tuple[Answer, ...]) -> None:
        self.requests: list[DiagRequest] = []
        self._answers = answers
        self._threads: list[threading.Thread] = []

    def __call__(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.settimeout(DEADLINE_SECONDS)
        thread = threading.Thread(target=self._serve, args=(theirs,))
        thread.start()
        self._threads.append(thread)

        return ours

    def join(self) -> None:
        """
        Wait for every serving thread to finish.
        """
        for thread in self._threads:
            thread.join(DEADLINE_SECONDS)

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            sock.settimeout(DEADLINE_SECONDS)
            for answer in self._answers:
                raw = sock.recv(4096)
                if not raw:
                    return
                request = DiagRequest.parse(raw)
                self.requests.append(request)
                sock.send(answer(request))


@pytest.fixture
def sample_proc_net(tmp_path: Path) -> Path:
    """
    A directory holding SAMPLE_TCP and SAMPLE_TCP6 as tcp and tcp6.
    """
    return write_tables(tmp_path, SAMPLE_TCP, SAMPLE_TCP6)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """
    A short directory any uid can enter, for Unix socket paths.
    """
    # tmp_path is too long for sun_path's 108 bytes on long test names,
    # and sits under a 0700 directory that nobody cannot enter.
    directory = Path(tempfile.mkdtemp(prefix="peer-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def ipv6_loopback() -> None:
    """
    Skip unless this machine can listen on ::1.
    """
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"IPv6 loopback unavailable: {exc}")


@pytest.fixture(scope="session")
def nobody_python() -> str:
    """
    A Python interpreter that uid 65534 may run; skips when there is none.
    """
    if os.geteuid() != 0:
        pytest.skip("starting a client as uid 65534 (nobody) needs root")

    # The venv's interpreter may live under a directory nobody cannot
    # enter (here /root, mode 0700), so try the system's as well.
    candidates = [sys.executable, shutil.which("python3"), "/usr/bin/python3"]
    for candidate in dict.fromkeys(c for c in candidates if c is not None):
        try:
            probe = subprocess.run(
                [candidate, "-I", "-S", "-c", "pass"],
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                cwd="/",
                env={},
                capture_output=True,
                timeout=DEADLINE_SECONDS,
                check=False,
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate

    pytest.skip(f"no Python that uid {NOBODY} may run among {candidates}")


@pytest.fixture
def start_nobody_client(
    nobody_python: str,
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """
    Start clients as nobody, and end them when the test ends.
    """
    children: list[subprocess.Popen[bytes]] = []

    def start(
        kind: str, target: str, *, half_close: bool = False
    ) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            [
                nobody_python,
                *("-I", "-S", "-c", CLIENT_CODE),
                *(kind, target, "1" if half_close else "0"),
            ],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd="/",
            env={},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Unbuffered, so that readline() takes no more than a line
            # and select() sees every line still unread.
            bufsize=0,
        )
        children.append(child)

        return child

    yield start

    # Closing stdin lets each child finish; kill only one that hangs.
    for child in children:
        try:
            child.communicate(timeout=DEADLINE_SECONDS)
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()


@pytest.fixture
def listener_v4() -> Iterator[socket.socket]:
    """
    A TCP listener on 127.0.0.1 whose accept() gives up at the deadline.
    """
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(DEADLINE_SECONDS)
        yield listener


@pytest.fixture
def fake_sock_diag() -> Iterator[Callable[..., FakeSockDiag]]:
    """
    Make fake kernels scripted with answers; wait for them at the end.
    """
    fakes: list[FakeSockDiag] = []

    def make(*answers: Answer) -> FakeSockDiag:
        fake = FakeSockDiag(answers)
        fakes.append(fake)

        return fake

    yield make

    for fake in fakes:
        fake.join()


#: peer_of_tcp with its server and client, answered one way or another.
Lookup = Callable[[tuple[str, int], tuple[str, int]], Peer | None]


@pytest.fixture(params=["netlink", "tables"])
def lookup(request: pytest.FixtureRequest, tmp_path: Path) -> Lookup:
    """
    peer_of_tcp on the running kernel, answered by netlink alone (with
    no tables to fall back on), or by /proc/net's tables alone.
    """
    if request.param == "netlink":
        return functools.partial(peer_of_tcp, proc_net=tmp_path)

    return functools.partial(peer_of_tcp, sock_diag=None)


@little_endian_only
class TestParseSocketTable:
    """
    parse_socket_table reads the kernel's text and skips what it can't.
    """

    def test_reads_ipv4_entries(self) -> None:
        """
        Every IPv4 line becomes an entry; the header is skipped.
        """
        entries = list(parse_socket_table(SAMPLE_TCP))

        assert entries == SAMPLE_TCP_ENTRIES

    def test_reads_ipv6_entries_and_unmaps_ipv4(self) -> None:
        """
        IPv6 lines decode word by word; v4-mapped addresses become IPv4.
        """
        entries = list(parse_socket_table(SAMPLE_TCP6))

        assert entries == SAMPLE_TCP6_ENTRIES

    @pytest.mark.parametrize("line", MALFORMED_LINES)
    def test_skips_a_malformed_line(self, line: str) -> None:
        """
        A malformed line is skipped and the lines around it still count.
        """
        text = f"{VALID_LINE}\n{line}\n{VALID_LINE}\n"

        entries = list(parse_socket_table(text))

        assert entries == [SAMPLE_TCP_ENTRIES[4]] * 2

    def test_reads_a_last_line_without_newline(self) -> None:
        """
        The final line counts even when the text ends without a newline.
        """
        entries = list(parse_socket_table(VALID_LINE))

        assert entries == [SAMPLE_TCP_ENTRIES[4]]


@little_endian_only
class TestPeerOfTcpOnSamples:
    """
    peer_of_tcp picks the client's own socket out of sample tables.
    """

    def test_finds_the_client_end_not_ours(
        self, sample_proc_net: Path
    ) -> None:
        """
        The client's own socket names the caller, not ours or its
        neighbours on the same port.
        """
        peer = peer_of_tcp(
            ("127.0.0.1", 8080),
            ("127.0.0.1", 40000),
            sample_proc_net,
            sock_diag=None,
        )

        assert peer == Peer(uid=1000, gid=None, pid=None)

    @pytest.mark.parametrize(
        ("client_port", "expected"),
        [
            pytest.param(40001, None, id="time-wait-is-uid-0"),
            pytest.param(40002, Peer(1001, None, None), id="fin-wait2"),
            pytest.param(40003, None, id="listen"),
            pytest.param(40009, None, id="absent"),
        ],
    )
    def test_counts_only_owned_states(
        self, sample_proc_net: Path, client_port: int, expected: Peer | None
    ) -> None:
        """
        Half-closed clients count; TIME_WAIT and LISTEN entries do not.
        """
        peer = peer_of_tcp(
            ("127.0.0.1", 8080),
            ("127.0.0.1", client_port),
            sample_proc_net,
            sock_diag=None,
        )

        assert peer == expected

    @pytest.mark.parametrize(
        ("server", "client", "uid"),
        [
            pytest.param(("::1", 8080), ("::1", 42000), 1003, id="ipv6"),
            pytest.param(
                ("::1", 8080, 0, 0), ("::1", 42000, 0, 0), 1003, id="4-tuple"
            ),
            pytest.param(
                ("::ffff:127.0.0.1", 8080, 0, 0),
                ("::ffff:127.0.0.1", 40000, 0, 0),
                1000,
                id="mapped-caller-in-tcp",
            ),
            pytest.param(
                ("127.0.0.1", 8080),
                ("127.0.0.1", 42001),
                1004,
                id="plain-caller-in-tcp6",
            ),
        ],
    )
    def test_matches_across_tables_and_forms(
        self,
        sample_proc_net: Path,
        server: tuple[str, int],
        client: tuple[str, int],
        uid: int,
    ) -> None:
        """
        v4, v6 and v4-mapped addresses meet whichever table holds them.
        """
        peer = peer_of_tcp(server, client, sample_proc_net, sock_diag=None)

        assert peer == Peer(uid=uid, gid=None, pid=None)

    def test_finds_a_last_line_without_newline(self, tmp_path: Path) -> None:
        """
        The caller's socket counts even on a final line with no newline.
        """
        proc_net = write_tables(tmp_path, VALID_LINE, "")

        peer = peer_of_tcp(
            ("127.0.0.1", 8080), ("127.0.0.1", 40000), proc_net, sock_diag=None
        )

        assert peer == Peer(uid=1000, gid=None, pid=None)

    def test_missing_tables_give_none(self, tmp_path: Path) -> None:
        """
        Without the tables there is no answer, and no exception.
        """
        peer = peer_of_tcp(
            ("127.0.0.1", 8080), ("127.0.0.1", 40000), tmp_path, sock_diag=None
        )

        assert peer is None

    def test_undecodable_bytes_spoil_only_their_lines(
        self, tmp_path: Path
    ) -> None:
        """
        Bytes that are not ASCII spoil only the lines that hold them.
        """
        garbage = b"\xff\xfe\x00 garbage \xc3\n"
        (tmp_path / "tcp").write_bytes(garbage + VALID_LINE.encode() + garbage)

        peer = peer_of_tcp(
            ("127.0.0.1", 8080), ("127.0.0.1", 40000), tmp_path, sock_diag=None
        )

        assert peer == Peer(uid=1000, gid=None, pid=None)

    @pytest.mark.parametrize(
        "address",
        [
            pytest.param(None, id="none"),
            pytest.param((), id="empty"),
            pytest.param(("127.0.0.1",), id="no-port"),
            pytest.param(("localhost", 8080), id="name"),
            pytest.param(("127.0.0.1", "http"), id="port-name"),
            pytest.param(("127.0.0.1", 65536), id="port-too-high"),
            pytest.param(("127.0.0.1", -1), id="port-negative"),
            pytest.param((None, 8080), id="host-none"),
            pytest.param("", id="unix-peername"),
        ],
    )
    def test_bad_addresses_give_none(
        self, sample_proc_net: Path, address: object
    ) -> None:
        """
        An address that is not an IP and port gives None, never raises.
        """
        as_client = peer_of_tcp(
            ("127.0.0.1", 8080),
            address,  # type: ignore[arg-type]
            sample_proc_net,
        )
        as_server = peer_of_tcp(
            address,  # type: ignore[arg-type]
            ("127.0.0.1", 40000),
            sample_proc_net,
        )

        assert (as_client, as_server) == (None, None)


@little_endian_only
class TestSockDiagOnAFake:
    """
    What peer_of_tcp asks of sock_diag, and makes of its answers, against
    a scripted stand-in for the kernel.
    """

    @pytest.mark.parametrize(
        ("server", "client", "family"),
        [
            pytest.param(
                ("127.0.0.1", 8080),
                ("127.0.0.2", 40000),
                socket.AF_INET,
                id="ipv4",
            ),
            pytest.param(
                ("::1", 8080, 0, 0),
                ("::2", 40000, 0, 0),
                socket.AF_INET6,
                id="ipv6",
            ),
            pytest.param(
                ("::ffff:127.0.0.1", 8080, 0, 0),
                ("::ffff:127.0.0.2", 40000, 0, 0),
                socket.AF_INET,
                id="mapped",
            ),
        ],
    )
    def test_asks_for_the_client_socket_alone(
        self,
        fake_sock_diag: Callable[..., FakeSockDiag],
        tmp_path: Path,
        server: tuple[str, int],
        client: tuple[str, int],
        family: int,
    ) -> None:
        """
        One request, not a dump, names the client's socket by its
        four-tuple, v4-mapped addresses as IPv4; its owner is the peer.
        """
        fake = fake_sock_diag(answer_socket(2000))

        peer = peer_of_tcp(server, client, tmp_path, sock_diag=fake)

        assert peer == Peer(uid=2000, gid=None, pid=None)
        v4 = family == socket.AF_INET
        assert fake.requests == [
            DiagRequest(
                length=DIAG_REQUEST.size,
                kind=SOCK_DIAG_BY_FAMILY,
                flags=NLM_F_REQUEST,
                family=family,
                protocol=socket.IPPROTO_TCP,
                extensions=0,
                states=OWNED_STATES_MASK,
                sport=40000,
                dport=8080,
                src=diag_packed("127.0.0.2" if v4 else "::2"),
                dst=diag_packed("127.0.0.1" if v4 else "::1"),
                interface=0,
                cookie=b"\xff" * 8,
            )
        ]

    def test_takes_an_ipv4_socket_listed_as_ipv6(
        self, fake_sock_diag: Callable[..., FakeSockDiag], tmp_path: Path
    ) -> None:
        """
        An AF_INET6 client socket connected to a v4-mapped address is
        listed in its own family, v4-mapped, and counts.
        """
        fake = fake_sock_diag(
            answer_socket(
                2000,
                family=socket.AF_INET6,
                src=diag_packed("::ffff:127.0.0.1"),
                dst=diag_packed("::ffff:127.0.0.1"),
            )
        )

        peer = peer_of_tcp(
            ("127.0.0.1", 8080), ("127.0.0.1", 40000), tmp_path, sock_diag=fake
        )

        assert peer == Peer(uid=2000, gid=None, pid=None)

    @pytest.mark.parametrize(
        "changes",
        [
            pytest.param({"sport": 40001}, id="other-client-port"),
            pytest.param({"dport": 8081}, id="other-server-port"),
            pytest.param(
                {"src": diag_packed("127.0.0.2")}, id="other-client-address"
            ),
            pytest.param(
                {"dst": diag_packed("127.0.0.2")}, id="other-server-address"
            ),
            pytest.param(
                {"state": 0x0A, "dport": 0, "dst": bytes(16)}, id="listener"
            ),
            pytest.param(
                {"state": TCP_TIME_WAIT, "uid": 0}, id="time-wait-is-uid-0"
            ),
        ],
    )
    def test_rejects_an_answer_for_another_socket(
        self,
        fake_sock_diag: Callable[..., FakeSockDiag],
        sample_proc_net: Path,
        changes: dict[str, Any],
    ) -> None:
        """
        An answer naming another four-tuple, or the socket in a state that
        no longer carries its owner, gives None without reading tables
        (which list the caller as uid 1000).
        """
        fake = fake_sock_diag(answer_socket(2000, **changes))

        peer = peer_of_tcp(
            ("127.0.0.1", 8080),
            ("127.0.0.1", 40000),
            sample_proc_net,
            sock_diag=fake,
        )

        assert peer is None
        assert len(fake.requests) == 1

    def test_no_such_socket_is_final(
        self,
        fake_sock_diag: Callable[..., FakeSockDiag],
        sample_proc_net: Path,
    ) -> None:
        """
        ENOENT for the caller's socket gives None once our own end is
        found, without reading the tables.
        """
        fake = fake_sock_diag(answer_error(errno.ENOENT), answer_socket(0))

        peer = peer_of_tcp(
            ("127.0.0.1", 8080),
            ("127.0.0.1", 40000),
            sample_proc_net,
            sock_diag=fake,
        )

        assert peer is None
        assert [(r.sport, r.dport) for r in fake.requests] == [
            (40000, 8080),
            (8080, 40000),
        ]

    @pytest.mark.parametrize(
        "answers",
        [
            pytest.param(
                (answer_error(errno.ENOENT), answer_error(errno.ENOENT)),
                id="enoent-for-both-ends",
            ),
            pytest.param((answer_error(errno.EINVAL),), id="error"),
            pytest.param((answer_error(0),), id="acknowledgement"),
            pytest.param((lambda _: bytes(8),), id="short"),
            pytest.param(
                (lambda request: answer_socket(2000)(request)[:60],),
                id="cut-short",
            ),
            pytest.param((answer_socket(2000, seq=99),), id="other-request"),
            pytest.param((answer_socket(2000, kind=NLMSG_DONE),), id="done"),
            pytest.param((answer_socket(2000, family=99),), id="family-99"),
            pytest.param((), id="hung-up"),
        ],
    )
    def test_falls_back_when_netlink_cannot_answer(
        self,
        fake_sock_diag: Callable[..., FakeSockDiag],
        sample_proc_net: Path,
        answers: tuple[Answer, ...],
    ) -> None:
        """
        An error, a malformed answer or none at all sends the lookup to
        the tables, which list the caller as uid 1000.
        """
        fake = fake_sock_diag(*answers)

        peer = peer_of_tcp(
            ("127.0.0.1", 8080),
            ("127.0.0.1", 40000),
            sample_proc_net,
            sock_diag=fake,
        )

        assert peer == Peer(uid=1000, gid=None, pid=None)

    @pytest.mark.parametrize(
        "code",
        [
            pytest.param(errno.EPERM, id="EPERM"),
            pytest.param(errno.EAFNOSUPPORT, id="EAFNOSUPPORT"),
            pytest.param(errno.EPROTONOSUPPORT, id="EPROTONOSUPPORT"),
        ],
    )
    def test_falls_back_when_netlink_is_refused(
        self, sample_proc_net: Path, code: int
    ) -> None:
        """
        Where the netlink socket can't be opened, the tables answer.
        """
        peer = peer_of_tcp(
            ("127.0.0.1", 8080),
            ("127.0.0.1", 40000),
            sample_proc_net,
            sock_diag=refused(code),
        )

        assert peer == Peer(uid=1000, gid=None, pid=None)


class TestParseDiagReply:
    """
    parse_diag_reply decodes the kernel's answer, or says why it can't.
    """

    @pytest.mark.parametrize(
        ("family", "client", "server"),
        [
            pytest.param(socket.AF_INET, "127.0.0.2", "127.0.0.1", id="ipv4"),
            pytest.param(socket.AF_INET6, "::2", "::1", id="ipv6"),
            pytest.param(
                socket.AF_INET6,
                "::ffff:127.0.0.2",
                "::ffff:127.0.0.1",
                id="mapped",
            ),
        ],
    )
    def test_reads_a_socket(
        self, family: int, client: str, server: str
    ) -> None:
        """
        Ports come big-endian, addresses in network order, v4-mapped ones
        unmapped; the attributes after the message are ignored.
        """
        reply = DiagMessage(
            seq=7,
            family=family,
            state=TCP_ESTABLISHED,
            sport=40000,
            dport=8080,
            src=diag_packed(client),
            dst=diag_packed(server),
            uid=0xFFFFFFFE,
        ).encode()

        entry = parse_diag_reply(reply, 7)

        assert entry == SocketEntry(
            unmapped(ipaddress.ip_address(client)),
            40000,
            unmapped(ipaddress.ip_address(server)),
            8080,
            TCP_ESTABLISHED,
            0xFFFFFFFE,
        )

    def test_no_such_socket_gives_none(self) -> None:
        """
        The kernel's ENOENT means that it has no such socket.
        """
        request = DiagRequest.parse(bytes(DIAG_REQUEST.size))
        reply = answer_error(errno.ENOENT)(replace(request, seq=7))

        entry = parse_diag_reply(reply, 7)

        assert entry is None

    def test_other_errors_raise_their_errno(self) -> None:
        """
        Any other error the kernel reports is raised with its errno.
        """
        request = DiagRequest.parse(bytes(DIAG_REQUEST.size))
        reply = answer_error(errno.EACCES)(replace(request, seq=7))

        with pytest.raises(PermissionError) as raised:
            parse_diag_reply(reply, 7)

        assert raised.value.errno == errno.EACCES

    @given(st.binary(max_size=200), st.integers(0, 0xFFFFFFFF))
    @example(
        NLMSG_HEADER.pack(87, SOCK_DIAG_BY_FAMILY, 0, 7, 0) + bytes(71), 7
    ).via("a message one byte short of an inet_diag_msg")
    def test_raises_nothing_but_oserror(self, reply: bytes, seq: int) -> None:
        """
        Whatever the bytes, the answer is an entry, None or an OSError.
        """
        with contextlib.suppress(OSError):
            entry = parse_diag_reply(reply, seq)

            assert entry is None or isinstance(entry, SocketEntry)


IP_VERSIONS: tuple[Literal[4, 6], ...] = (4, 6)
ip_versions = st.sampled_from(IP_VERSIONS)
ports = st.integers(min_value=0, max_value=0xFFFF)
uids = st.integers(min_value=0, max_value=0xFFFFFFFE)


def unmapped(address: IPAddress) -> IPAddress:
    """
    The IPv4 address inside a v4-mapped one, else ``address`` itself.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped

    return address


def same_end(first: Endpoint, second: Endpoint) -> bool:
    """
    Whether two ends are one, once v4-mapped addresses are unmapped.
    """
    return (unmapped(first[0]), first[1]) == (unmapped(second[0]), second[1])


@dataclass(frozen=True)
class Connection:
    """
    A server end, a distinct client end, and decoys: sockets that differ
    from the client's in one field only.
    """

    server: Endpoint
    client: Endpoint
    decoys: tuple[tuple[Endpoint, Endpoint], ...] = ()


@st.composite
def connections(draw: st.DrawFn) -> Connection:
    """
    Connections of one family, with a decoy for each field that can be
    changed without making it the client's socket.
    """
    version = draw(ip_versions)
    addresses = st.ip_addresses(v=version)
    server = (draw(addresses), draw(ports))
    client = draw(
        st.tuples(addresses, ports).filter(
            lambda end: not same_end(end, server)
        )
    )
    other_address, other_port = draw(addresses), draw(ports)
    decoys = [
        ((other_address, client[1]), server),
        ((client[0], other_port), server),
        (client, (other_address, server[1])),
        (client, (server[0], other_port)),
    ]

    return Connection(
        server=server,
        client=client,
        decoys=tuple(
            (local, remote)
            for local, remote in decoys
            if not (same_end(local, client) and same_end(remote, server))
        ),
    )


@st.composite
def socket_entries(draw: st.DrawFn) -> SocketEntry:
    """
    Entries with random addresses of one family, ports, state and uid.
    """
    version = draw(ip_versions)

    return SocketEntry(
        local_address=draw(st.ip_addresses(v=version)),
        local_port=draw(ports),
        remote_address=draw(st.ip_addresses(v=version)),
        remote_port=draw(ports),
        state=draw(st.integers(min_value=0, max_value=0xFF)),
        uid=draw(uids),
    )


class TestProperties:
    """
    Parsing never raises, and what the kernel's layout encodes decodes.
    """

    @given(
        st.text()
        | st.lists(
            st.sampled_from([VALID_LINE, SAMPLE_TCP, SAMPLE_TCP6])
            | st.text(alphabet="0123456789ABCDEF:. \t\n-x")
        ).map("".join)
    )
    @example("   0: 0100007F:1F90 0100007F:9C40 01 a b c 99999999999")
    def test_parse_never_raises(self, text: str) -> None:
        """
        Any text parses to some entries, each of them well formed.
        """
        entries = list(parse_socket_table(text))

        assert all(
            entry.local_port <= 0xFFFF
            and entry.remote_port <= 0xFFFF
            and entry.state <= 0xFF
            and entry.uid >= 0
            for entry in entries
        )

    @given(socket_entries())
    @example(
        SocketEntry(
            ipaddress.IPv6Address("::ffff:127.0.0.1"),
            0,
            ipaddress.IPv6Address("::ffff:10.0.0.1"),
            0xFFFF,
            0x0A,
            0,
        )
    )
    @example(
        SocketEntry(
            ipaddress.IPv4Address("255.255.255.255"),
            1,
            ipaddress.IPv4Address(0),
            2,
            0xFF,
            0xFFFFFFFE,
        )
    )
    def test_encoded_entries_round_trip(self, entry: SocketEntry) -> None:
        """
        A line encoded in the kernel's layout parses back to its entry.
        """
        line = table_line(
            (entry.local_address, entry.local_port),
            (entry.remote_address, entry.remote_port),
            entry.state,
            entry.uid,
        )

        parsed = list(parse_socket_table(line))

        assert parsed == [
            SocketEntry(
                unmapped(entry.local_address),
                entry.local_port,
                unmapped(entry.remote_address),
                entry.remote_port,
                entry.state,
                entry.uid,
            )
        ]

    @given(connections(), uids.filter(lambda uid: uid != DECOY_UID))
    @example(
        Connection(
            server=(LOOPBACK_V4, 8080),
            client=(OTHER_LOOPBACK_V4, 8080),
            decoys=(
                ((OTHER_LOOPBACK_V4, 5555), (LOOPBACK_V4, 8080)),
                ((LOOPBACK_V4, 8080), (OTHER_LOOPBACK_V4, 8080)),
            ),
        ),
        1000,
    ).via("both ends on one port, which a decoy's remote end shares")
    @example(
        Connection(
            server=(ipaddress.IPv6Address("::ffff:127.0.0.1"), 8080),
            client=(ipaddress.IPv6Address("::ffff:127.0.0.1"), 40000),
        ),
        65534,
    ).via("v4-mapped, found in tcp6 after missing in tcp")
    def test_lookup_finds_the_client_end(
        self, connection: Connection, uid: int
    ) -> None:
        """
        Among our end and decoys, all listed first, the lookup finds the
        client's own socket.
        """
        server, client = connection.server, connection.client
        lines = [
            table_line(server, client, 0x01, 0),
            *(
                table_line(local, remote, 0x01, DECOY_UID)
                for local, remote in connection.decoys
            ),
            table_line(client, server, 0x01, uid),
        ]
        text = "\n".join(lines) + "\n"
        v4 = server[0].version == 4

        with tempfile.TemporaryDirectory() as directory:
            proc_net = write_tables(
                Path(directory), text if v4 else "", "" if v4 else text
            )
            peer = peer_of_tcp(
                (str(server[0]), server[1]),
                (str(client[0]), client[1]),
                proc_net,
                sock_diag=None,
            )

        assert peer == Peer(uid=uid, gid=None, pid=None)


class TestRealTcp:
    """
    peer_of_tcp against the running kernel, with both ends in this process.
    """

    def test_ipv4_loopback(
        self, lookup: Lookup, listener_v4: socket.socket
    ) -> None:
        """
        A client on 127.0.0.1 is found, owned by our uid.
        """
        with socket.create_connection(listener_v4.getsockname()):
            accepted, _ = listener_v4.accept()
            with accepted:
                peer = lookup(accepted.getsockname(), accepted.getpeername())

        assert peer == Peer(uid=os.getuid(), gid=None, pid=None)

    @pytest.mark.usefixtures("ipv6_loopback")
    def test_ipv6_client_of_an_ipv4_listener(
        self, lookup: Lookup, listener_v4: socket.socket
    ) -> None:
        """
        A client whose AF_INET6 socket reached 127.0.0.1 by its v4-mapped
        address is found, though both ends report plain IPv4.
        """
        _, port = listener_v4.getsockname()
        with socket.socket(socket.AF_INET6) as client:
            client.connect(("::ffff:127.0.0.1", port))
            accepted, _ = listener_v4.accept()
            with accepted:
                server, peername = (
                    accepted.getsockname(),
                    accepted.getpeername(),
                )
                peer = lookup(server, peername)

        assert peername[0] == "127.0.0.1"
        assert peer == Peer(uid=os.getuid(), gid=None, pid=None)

    @pytest.mark.usefixtures("ipv6_loopback")
    @pytest.mark.parametrize(
        ("listen_host", "connect_host", "server_host"),
        [
            pytest.param("::1", "::1", "::1", id="ipv6"),
            # An AF_INET6 listener on the mapped address takes IPv4
            # callers, and reports both ends as ::ffff:127.0.0.1.
            pytest.param(
                "::ffff:127.0.0.1",
                "127.0.0.1",
                "::ffff:127.0.0.1",
                id="mapped",
            ),
        ],
    )
    def test_ipv6_listener(
        self,
        lookup: Lookup,
        listen_host: str,
        connect_host: str,
        server_host: str,
    ) -> None:
        """
        Callers of an IPv6 listener are found, v4-mapped ones included.
        """
        with socket.socket(socket.AF_INET6) as listener:
            listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind((listen_host, 0))
            listener.listen()
            listener.settimeout(DEADLINE_SECONDS)
            port = listener.getsockname()[1]
            with socket.create_connection((connect_host, port)):
                accepted, _ = listener.accept()
                with accepted:
                    server = accepted.getsockname()
                    peer = lookup(server, accepted.getpeername())

        assert server[0] == server_host
        assert peer == Peer(uid=os.getuid(), gid=None, pid=None)

    def test_half_closed_counts_and_time_wait_does_not(
        self, lookup: Lookup, listener_v4: socket.socket
    ) -> None:
        """
        A caller that shut down writing counts; once in TIME_WAIT, not.
        """
        with socket.create_connection(listener_v4.getsockname()) as client:
            client.settimeout(DEADLINE_SECONDS)
            accepted, _ = listener_v4.accept()
            with accepted:
                accepted.settimeout(DEADLINE_SECONDS)
                server = accepted.getsockname()
                peername = accepted.getpeername()
                client.shutdown(socket.SHUT_WR)
                # EOF here means the client's FIN has arrived.
                assert accepted.recv(1) == b""
                half_closed = lookup(server, peername)
            # The kernel moves the client to TIME_WAIT before it wakes
            # the reader, so EOF here means the swap has happened.
            assert client.recv(1) == b""
            closed = lookup(server, peername)

        assert half_closed == Peer(uid=os.getuid(), gid=None, pid=None)
        assert closed is None

    @little_endian_only
    def test_no_such_socket_on_netlink_is_final(
        self, listener_v4: socket.socket, tmp_path: Path
    ) -> None:
        """
        When netlink has no socket for the four-tuple, tables that list one
        are not read.
        """
        server = listener_v4.getsockname()
        # Bound but never connected: no connection can come from it.
        with socket.socket() as unconnected:
            unconnected.bind(("127.0.0.1", 0))
            client = unconnected.getsockname()
            line = table_line(
                (LOOPBACK_V4, client[1]), (LOOPBACK_V4, server[1]), 0x01, 1000
            )
            proc_net = write_tables(tmp_path, line, "")

            peer = peer_of_tcp(server, client, proc_net)
            from_tables = peer_of_tcp(server, client, proc_net, sock_diag=None)

        assert peer is None
        assert from_tables == Peer(uid=1000, gid=None, pid=None)

    @pytest.mark.parametrize(
        "code",
        [
            pytest.param(errno.EPERM, id="EPERM"),
            pytest.param(errno.EAFNOSUPPORT, id="EAFNOSUPPORT"),
            pytest.param(errno.EPROTONOSUPPORT, id="EPROTONOSUPPORT"),
        ],
    )
    def test_refused_netlink_falls_back_to_proc(
        self, listener_v4: socket.socket, code: int
    ) -> None:
        """
        Where netlink is refused, /proc/net's tables find the caller.
        """
        with socket.create_connection(listener_v4.getsockname()):
            accepted, _ = listener_v4.accept()
            with accepted:
                peer = peer_of_tcp(
                    accepted.getsockname(),
                    accepted.getpeername(),
                    sock_diag=refused(code),
                )

        assert peer == Peer(uid=os.getuid(), gid=None, pid=None)


class TestRealUnix:
    """
    peer_of_unix_socket against the running kernel, in this process.
    """

    def test_socketpair(self) -> None:
        """
        A socketpair's peer is this very process.
        """
        left, right = socket.socketpair()
        with left, right:
            peer = peer_of_unix_socket(left)

        assert peer == Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())

    def test_accepted_connection(self, socket_dir: Path) -> None:
        """
        An accepted connection's peer is the process that connected.
        """
        path = str(socket_dir / "sock")
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(path)
            listener.listen()
            listener.settimeout(DEADLINE_SECONDS)
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)
                accepted, _ = listener.accept()
                with accepted:
                    peer = peer_of_unix_socket(accepted)

        assert peer == Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())

    async def test_asyncio_transport_socket(self, socket_dir: Path) -> None:
        """
        The socket an asyncio transport hands out works as well.
        """
        path = str(socket_dir / "sock")
        peers: asyncio.Queue[Peer | None] = asyncio.Queue()

        async def handle(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await peers.put(
                peer_of_unix_socket(writer.get_extra_info("socket"))
            )
            writer.close()

        server = await asyncio.start_unix_server(handle, path)
        async with server:
            _, writer = await asyncio.open_unix_connection(path)
            peer = await asyncio.wait_for(peers.get(), DEADLINE_SECONDS)
            writer.close()
            await writer.wait_closed()

        assert peer == Peer(uid=os.getuid(), gid=os.getgid(), pid=os.getpid())

    def test_unconnected_socket_gives_none(self) -> None:
        """
        A Unix socket with no peer has no credentials to report.
        """
        with socket.socket(socket.AF_UNIX) as lonely:
            peer = peer_of_unix_socket(lonely)

        assert peer is None

    def test_closed_socket_gives_none(self) -> None:
        """
        A closed socket gives None rather than raising.
        """
        left, right = socket.socketpair()
        right.close()
        left.close()

        peer = peer_of_unix_socket(left)

        assert peer is None

    def test_tcp_socket_gives_none(self, listener_v4: socket.socket) -> None:
        """
        SO_PEERCRED is asked of Unix sockets only.
        """
        peer = peer_of_unix_socket(listener_v4)

        assert peer is None


class TestOtherUid:
    """
    A client running as nobody (uid 65534) is told apart from us (root).
    """

    def test_tcp_client(
        self,
        lookup: Lookup,
        listener_v4: socket.socket,
        start_nobody_client: Callable[..., subprocess.Popen[bytes]],
    ) -> None:
        """
        The caller's uid is nobody's; our own end of it is root's.
        """
        host, port = listener_v4.getsockname()
        child = start_nobody_client("tcp", f"{host}:{port}")
        assert read_line(child) == "connected"
        accepted, _ = listener_v4.accept()
        with accepted:
            server, client = accepted.getsockname(), accepted.getpeername()

            peer = lookup(server, client)
            our_end = lookup(client, server)

        assert peer == Peer(uid=NOBODY, gid=None, pid=None)
        assert our_end == Peer(uid=0, gid=None, pid=None)

    def test_unix_client(
        self,
        socket_dir: Path,
        start_nobody_client: Callable[..., subprocess.Popen[bytes]],
    ) -> None:
        """
        The caller's uid, gid and pid are nobody's and the child's.
        """
        path = socket_dir / "sock"
        with socket.socket(socket.AF_UNIX) as listener:
            listener.bind(str(path))
            # connect() needs write permission on the socket file.
            path.chmod(0o666)
            listener.listen()
            listener.settimeout(DEADLINE_SECONDS)
            child = start_nobody_client("unix", str(path))
            assert read_line(child) == "connected"
            accepted, _ = listener.accept()
            with accepted:
                peer = peer_of_unix_socket(accepted)

        assert peer == Peer(uid=NOBODY, gid=NOBODY, pid=child.pid)

    def test_half_closed_then_time_wait(
        self,
        lookup: Lookup,
        listener_v4: socket.socket,
        start_nobody_client: Callable[..., subprocess.Popen[bytes]],
    ) -> None:
        """
        A half-closed caller counts; its TIME_WAIT remains, listed as
        uid 0, do not.
        """
        host, port = listener_v4.getsockname()
        child = start_nobody_client("tcp", f"{host}:{port}", half_close=True)
        assert read_line(child) == "connected"
        accepted, _ = listener_v4.accept()
        with accepted:
            accepted.settimeout(DEADLINE_SECONDS)
            server, client = accepted.getsockname(), accepted.getpeername()
            assert accepted.recv(1) == b""
            half_closed = lookup(server, client)
        # The child reads EOF only after its kernel has handled our FIN,
        # which moves its socket to TIME_WAIT first.
        assert read_line(child) == "eof"

        closed = lookup(server, client)
        remains = entries_of_tuple(client, server)

        assert half_closed == Peer(uid=NOBODY, gid=None, pid=None)
        assert closed is None
        assert {(e.state, e.uid) for e in remains} <= {(TCP_TIME_WAIT, 0)}
