"""Drive the oidc-provider test IdP in ``tests/interop/idp`` from pytest.

The IdP is a real, independent OAuth 2.0 server (the npm package
``oidc-provider``) bound to 127.0.0.1 only.  This module starts and stops
it, reads the client credentials it serves, generates the key pairs that
the ``private_key_jwt`` client signs with, and talks to its test-only
endpoints (request counters and secret rotation).

Install the Node dependencies once with::

    npm ci --prefix tests/interop/idp
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.tools import STARTUP_DEADLINE_SECONDS, describe_process

IDP_DIR = Path(__file__).resolve().parent / "idp"
SERVER_SCRIPT = IDP_DIR / "server.mjs"
CLIENTS_FILE = IDP_DIR / "clients.json"

#: Resource server the IdP knows unless started with another audience.
DEFAULT_AUDIENCE = "https://api.qlam.example"
#: Scopes the default resource server grants.
RESOURCE_SCOPES = ("orders.read", "orders.write")

POST_CLIENT = "sidecar-post"
BASIC_CLIENT = "sidecar-basic"
JWT_CLIENT = "sidecar-jwt"

# Loopback only: never let an http_proxy setting in the environment route
# these requests elsewhere.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class IdpError(RuntimeError):
    """The test IdP could not be installed, started or queried."""


def ensure_installed() -> None:
    """Raise IdpError unless node and the IdP's node_modules are present."""
    if shutil.which("node") is None:
        raise IdpError("node is not on PATH; the interop IdP needs Node.js")
    if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
        raise IdpError(
            f"{IDP_DIR / 'node_modules'} is missing; run "
            "`npm ci --prefix tests/interop/idp` from the repository root"
        )


def load_clients() -> dict[str, dict[str, str]]:
    """Return clients.json: client id -> {"auth_method", maybe "secret"}.

    These are the credentials the IdP starts with; a secret changed with
    :meth:`OidcProviderProcess.rotate_secret` is not reflected here.
    """
    with CLIENTS_FILE.open(encoding="utf-8") as fh:
        clients: dict[str, dict[str, str]] = json.load(fh)
    return clients


def client_secret(client_id: str) -> str:
    """Return the initial secret of a client_secret_* client."""
    return load_clients()[client_id]["secret"]


def write_test_keys(
    directory: os.PathLike[str] | str,
) -> tuple[Path, Path, Path]:
    """Create the private_key_jwt client's keys in ``directory``.

    Writes an RSA-2048 key (kid ``rs``, RS256) and an EC P-256 key (kid
    ``es``, ES256) as PKCS#8 PEM files readable only by the owner, plus the
    public JWKS the IdP registers for the ``sidecar-jwt`` client.

    Returns ``(rsa_pem_path, ec_pem_path, jwks_path)``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())

    rsa_path = directory / "client-rs.pem"
    ec_path = directory / "client-es.pem"
    for path, key in ((rsa_path, rsa_key), (ec_path, ec_key)):
        _write_private(
            path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )

    rsa_jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    ec_jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    rsa_jwk.update(kid="rs", alg="RS256", use="sig")
    ec_jwk.update(kid="es", alg="ES256", use="sig")
    jwks_path = directory / "client-jwks.json"
    jwks_path.write_text(
        json.dumps({"keys": [rsa_jwk, ec_jwk]}, indent=2), encoding="utf-8"
    )
    return rsa_path, ec_path, jwks_path


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it is never group/world readable."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    # O_CREAT's mode does not apply to a file that already existed.
    os.chmod(path, 0o600)


class OidcProviderProcess:
    """One ``node server.mjs`` process, bound to 127.0.0.1.

    State (counters, rotated secrets, issued opaque tokens, the signing
    key) lives only in the process, so :meth:`restart` resets all of it
    while keeping the port, and with it the issuer and token URL.
    """

    def __init__(self, audience: str = DEFAULT_AUDIENCE) -> None:
        """Prepare a process for ``audience``; :meth:`start` runs it."""
        self.audience = audience
        self._issuer: str | None = None
        self._token_url: str | None = None
        self._port: int | None = None
        self.ttl_seconds: int | None = None
        self.jwks_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(
        self,
        ttl_seconds: int,
        jwks_path: os.PathLike[str] | str,
        port: int = 0,
        timeout: float = STARTUP_DEADLINE_SECONDS,
    ) -> OidcProviderProcess:
        """Start the IdP and wait until it reports where it listens.

        ``port=0`` lets the OS choose a free port.  Raises IdpError,
        including the process's stderr, if it exits or stays silent for
        ``timeout`` seconds.
        """
        ensure_installed()
        if self._proc is not None:
            raise IdpError("IdP already started; stop() it first")
        self.ttl_seconds = int(ttl_seconds)
        self.jwks_path = Path(jwks_path)
        # stderr goes to a file, not a pipe: nothing drains it while the
        # tests run, and a full pipe would stall the server.  It must
        # outlive this method, so no context manager; stop() closes it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        cmd = [
            "node",
            str(SERVER_SCRIPT),
            "--port",
            str(port),
            "--ttl",
            str(self.ttl_seconds),
            "--jwks",
            str(self.jwks_path),
            "--audience",
            self.audience,
        ]
        try:
            self._proc = subprocess.Popen(
                cmd,
                cwd=IDP_DIR,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except OSError as exc:
            self._close_files()
            raise IdpError(f"could not run node: {exc}") from exc
        try:
            ready = self._read_ready_line(timeout)
        except BaseException:
            self._terminate()
            self._close_files()
            self._proc = None
            raise
        self._issuer = str(ready["issuer"])
        self._token_url = str(ready["token_url"])
        self._port = int(ready["port"])
        return self

    def _read_ready_line(self, timeout: float) -> dict[str, Any]:
        """Wait for the single JSON line the server prints when ready."""
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self._proc.stdout.fileno()
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise IdpError(
                        f"IdP printed no ready line within {timeout:.0f} s "
                        f"({describe_process(self._proc.pid)})"
                        + self._stderr_excerpt()
                    )
                if not sel.select(remaining):
                    continue
                chunk = os.read(fd, 4096)
                if not chunk:
                    code = self._proc.wait(timeout=5)
                    raise IdpError(
                        f"IdP exited with status {code} before it was "
                        "ready" + self._stderr_excerpt()
                    )
                buf += chunk
        line = buf.split(b"\n", 1)[0]
        try:
            ready = json.loads(line)
        except ValueError:
            ready = None
        keys = ("issuer", "token_url", "port")
        if not isinstance(ready, dict) or not all(k in ready for k in keys):
            raise IdpError(
                f"IdP ready line is not the expected JSON: {line[:200]!r}"
            )
        return ready

    def _stderr_excerpt(self) -> str:
        """Return the process's stderr so far, for error messages."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        text = self._stderr.read()[-4000:].decode("utf-8", "replace")
        return f"\n--- IdP stderr ---\n{text}" if text.strip() else ""

    def stderr_text(self) -> str:
        """Return everything the running process wrote to stderr."""
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the IdP, wait for it, SIGKILL if it lingers.

        Returns the exit status (0 after a clean SIGTERM shutdown), or None
        if nothing was running.
        """
        if self._proc is None:
            return None
        code = self._terminate(timeout)
        self._close_files()
        self._proc = None
        return code

    def _terminate(self, timeout: float = 10.0) -> int:
        """Stop the child process and return its exit status."""
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                return self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return self._proc.wait()

    def _close_files(self) -> None:
        """Close the stdout pipe and the stderr capture file."""
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def restart(
        self, timeout: float = STARTUP_DEADLINE_SECONDS
    ) -> OidcProviderProcess:
        """Stop and start again on the same port with the same settings."""
        if self._port is None or self.jwks_path is None:
            raise IdpError("restart() needs a previous start()")
        assert self.ttl_seconds is not None
        port = self._port
        self.stop()
        return self.start(self.ttl_seconds, self.jwks_path, port, timeout)

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> OidcProviderProcess:
        """Return self; use after start() to get stop() on exit."""
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Stop the IdP."""
        self.stop()

    # -- test-only endpoints -----------------------------------------------

    @property
    def issuer(self) -> str:
        """Issuer identifier, ``http://127.0.0.1:<port>``; also base URL."""
        if self._issuer is None:
            raise IdpError("IdP not started")
        return self._issuer

    @property
    def token_url(self) -> str:
        """Token endpoint URL."""
        if self._token_url is None:
            raise IdpError("IdP not started")
        return self._token_url

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1; kept across stop() for restart()."""
        if self._port is None:
            raise IdpError("IdP not started")
        return self._port

    @property
    def jwks_uri(self) -> str:
        """URL of the IdP's public signing keys for its JWT tokens."""
        return f"{self.issuer}/jwks"

    def stats(self) -> dict[str, Any]:
        """Return ``{"token_requests", "by_client", "issued"}``.

        ``token_requests`` counts every POST to the token endpoint,
        ``by_client`` those that named a known client (whether or not it
        authenticated), ``issued`` successful token responses.
        """
        return self._call("GET", "/__test__/stats")

    def reset(self) -> None:
        """Zero the counters."""
        self._call("POST", "/__test__/reset")

    def rotate_secret(self, client_id: str, secret: str) -> None:
        """Replace a client's secret in the running IdP.

        The old secret stops working at once.  The change is lost on
        restart.
        """
        quoted = urllib.parse.quote(client_id, safe="")
        self._call(
            "POST", f"/__test__/clients/{quoted}/secret", {"secret": secret}
        )

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Send a JSON request to a test endpoint and decode the answer."""
        data = None if body is None else json.dumps(body).encode()
        # The URL is the IdP's own http://127.0.0.1 issuer, never input.
        req = urllib.request.Request(  # noqa: S310
            self.issuer + path, data=data, method=method
        )
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with _OPENER.open(req, timeout=10) as resp:
                answer: dict[str, Any] = json.load(resp)
                return answer
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            raise IdpError(
                f"{method} {path} failed: HTTP {exc.code} {detail}"
            ) from exc
