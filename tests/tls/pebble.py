"""Real ACME for the tests: Debian's pebble and pebble-challtestsrv on loopback ports.

pebble-challtestsrv is the DNS server pebble asks: every name resolves to 127.0.0.1 (so
pebble's HTTP-01 requests reach our HTTP listener), and its management API publishes the
TXT records of DNS-01. Pebble serves its API over TLS with a certificate made here.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.harness import free_port, listening

PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_api_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and, signed by it, pebble's API certificate for 127.0.0.1/localhost:
    (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("tenement test CA"))
        .issuer_name(_name("tenement test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "pebble-ca.pem", folder / "pebble-cert.pem", folder / "pebble-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(_pem_key(key))
    return paths


class Pebble:
    """pebble + pebble-challtestsrv; `http_port` is where pebble validates HTTP-01."""

    def __init__(self, folder: Path, http_port: int, validity: int | None = None) -> None:
        self.folder = folder
        self.http_port = http_port
        self.validity = validity
        self.port = free_port()
        self.management = free_port()
        self.dns_port = free_port()
        self.challtest_port = free_port()
        self.ca, self.cert, self.key = make_api_certificate(folder)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pebble: subprocess.Popen[bytes] | None = None
        self._root: bytes | None = None

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self) -> None:
        self.start_challtestsrv()
        self.start_pebble()

    def start_challtestsrv(self) -> None:
        log = open(self.folder / "challtestsrv.log", "wb")
        argv = [
            CHALLTESTSRV,
            "-defaultIPv4", "127.0.0.1",
            "-defaultIPv6", "",
            "-dns01", f"127.0.0.1:{self.dns_port}",
            "-http01", "",
            "-https01", "",
            "-tlsalpn01", "",
            "-management", f"127.0.0.1:{self.challtest_port}",
        ]  # fmt: skip
        self.procs.append(
            subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        )
        log.close()
        self.wait_listening(self.challtest_port, "pebble-challtestsrv")

    def start_pebble(self) -> None:
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management}",
                "certificate": str(self.cert),
                "privateKey": str(self.key),
                "httpPort": self.http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        if self.validity is not None:
            config["pebble"]["certificateValidityPeriod"] = self.validity
        path = self.folder / "pebble-config.json"
        path.write_text(json.dumps(config))
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",  # validation at once; never PEBBLE_VA_ALWAYS_VALID
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",  # every order is validated for real
        }
        log = open(self.folder / "pebble.log", "ab")
        argv = [
            PEBBLE,
            "-config", str(path),
            "-dnsserver", f"127.0.0.1:{self.dns_port}",
            "-strict=false",
        ]  # fmt: skip
        self.pebble = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.procs.append(self.pebble)
        log.close()
        self.wait_listening(self.port, "pebble")

    def set_txt(self, name: str, value: str) -> None:
        """Publish a TXT record in challtestsrv's DNS."""
        body = json.dumps({"host": name.rstrip(".") + ".", "value": value})
        conn = http.client.HTTPConnection("127.0.0.1", self.challtest_port, timeout=10)
        try:
            conn.request("POST", "/set-txt", body=body)
            response = conn.getresponse()
            assert response.status == 200, response.read()
        finally:
            conn.close()

    def stop_pebble(self) -> None:
        """The CA goes down (challtestsrv stays)."""
        assert self.pebble is not None
        self.pebble.kill()
        self.pebble.wait()
        self.procs.remove(self.pebble)
        self.pebble = None

    def wait_listening(self, port: int, what: str) -> None:
        deadline = time.monotonic() + 20
        while not listening(port):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} did not start: {self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in self.folder.glob("*.log"))

    def api_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def root_pem(self) -> bytes:
        """The root pebble signs with (new per pebble run; kept once fetched, so the
        tests can still verify after the CA is stopped)."""
        if self._root is None:
            self._root = self.fetch_root()
        return self._root

    def fetch_root(self) -> bytes:
        conn = http.client.HTTPSConnection(
            "127.0.0.1", self.management, context=self.api_context(), timeout=10
        )
        try:
            conn.request("GET", "/roots/0")
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, body
            return body
        finally:
            conn.close()

    def orders_seen(self) -> int:
        """New orders pebble has logged (its log says so per order)."""
        return (self.folder / "pebble.log").read_text().count("Added order")

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self.procs.clear()


def tls_client_context(root: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=root.decode())
    context.set_alpn_protocols(["http/1.1"])
    return context


class _SniConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1 with SNI and verification for `host` (no DNS needed)."""

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass
class Handshake:
    alpn: str | None
    serial: int  # the leaf certificate's serial number


def https_request(
    port: int,
    host: str,
    context: ssl.SSLContext,
    path: str = "/",
    timeout: float = 30,
) -> tuple[http.client.HTTPResponse, bytes, Handshake]:
    """One GET over HTTPS (chain verified by `context`); the connection is closed."""
    conn = _SniConnection(host, port, context=context, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        der = conn.sock.getpeercert(binary_form=True)
        shake = Handshake(
            conn.sock.selected_alpn_protocol(), x509.load_der_x509_certificate(der).serial_number
        )
        return response, response.read(), shake
    finally:
        conn.close()
