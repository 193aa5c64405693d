"""The credentials of a Flower deployment with TLS and SuperNode authentication, made
with ``cryptography``: a certificate authority, the SuperLink's certificate (for
127.0.0.1 and localhost, or the names given) signed by it, and one key pair per
SuperNode (EC on NIST P-384, OpenSSH format: what ``flower-supernode
--auth-supernode-private-key`` and ``flwr supernode register`` read).

A credentials folder::

    ca.crt            the CA certificate: SuperNodes and ``flwr`` trust it
    ca.key            the CA's private key (0600): only needed to issue more certificates
    server.crt        the SuperLink's certificate
    server.key        its private key (0600)
    nodes/node-<i>    SuperNode i's private key (0600), OpenSSH PEM
    nodes/node-<i>.pub  its public key, one OpenSSH line: what gets registered

Private files are written atomically with mode 0600; the folder's existing files are
never overwritten.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeloop._io import write_bytes_atomic
from edgeloop.errors import UsageError

__all__ = ["Credentials", "make_credentials", "make_node_key"]

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, NODES = (
    "ca.crt", "ca.key", "server.crt", "server.key", "nodes")
_PRIVATE = 0o600
_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Credentials:
    """A credentials folder (module docstring); :meth:`check` says what is missing."""

    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / CA_CERT

    @property
    def server_cert(self) -> Path:
        return self.folder / SERVER_CERT

    @property
    def server_key(self) -> Path:
        return self.folder / SERVER_KEY

    def node_key(self, index: int) -> Path:
        """SuperNode ``index``'s private key (its public key: the same path + ``.pub``)."""
        return self.folder / NODES / f"node-{index}"

    def node_keys(self) -> list[Path]:
        """Every SuperNode private key in the folder, in index order."""
        keys = [p for p in (self.folder / NODES).glob("node-*") if p.suffix != ".pub"]
        return sorted(keys, key=lambda p: int(p.name.removeprefix("node-")))

    def check(self, *, server: bool = False) -> Credentials:
        """Raise the one-line :class:`UsageError` naming the first missing file: the CA
        certificate, and with ``server`` the SuperLink's certificate and key too."""
        needed = [self.ca_cert, *([self.server_cert, self.server_key] if server else [])]
        for path in needed:
            if not path.is_file():
                raise UsageError(f"{str(self.folder)!r} is not a credentials folder: no "
                                 f"{path.name} (make one with `edgeloop federated "
                                 "credentials`)")
        return self


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, *, issuer: x509.Name,
                 issuer_key: ec.EllipticCurvePrivateKey, days: int,
                 hosts: tuple[str, ...] | None) -> x509.Certificate:
    """The CA's own certificate when ``hosts`` is None, else a server certificate."""
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=hosts is None, path_length=None),
                              critical=True))
    if hosts is None:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = (builder.add_extension(_san(hosts), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def _fresh(paths: list[Path]) -> None:
    if taken := [p for p in paths if p.exists()]:
        raise UsageError(f"{str(taken[0])!r} already exists; credentials are never "
                         "overwritten: give a new folder")


def make_node_key(private: str | os.PathLike[str]) -> Path:
    """Write a new SuperNode key pair: ``private`` (0600) and ``private.pub``; returns the
    public key's path."""
    private = Path(private)
    public = private.with_name(private.name + ".pub")
    _fresh([private, public])
    key = ec.generate_private_key(ec.SECP384R1())
    write_bytes_atomic(private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), mode=_PRIVATE)
    write_bytes_atomic(public, key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return public


def make_credentials(folder: str | os.PathLike[str], *, nodes: int,
                     hosts: tuple[str, ...] = _HOSTS, days: int = 30) -> Credentials:
    """Write a CA, a SuperLink certificate for ``hosts`` valid ``days`` days, and
    ``nodes`` SuperNode key pairs into ``folder`` (module docstring)."""
    if nodes < 0:
        raise UsageError(f"`nodes` must be at least 0; got {nodes}")
    if days < 1:
        raise UsageError(f"`days` must be at least 1; got {days}")
    creds = Credentials(Path(folder))
    _fresh([creds.folder / CA_KEY, creds.ca_cert, creds.server_cert, creds.server_key,
            *(creds.node_key(i) for i in range(nodes))])
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = _certificate("edgeloop federated CA", ca_key, issuer=_name("edgeloop federated CA"),
                      issuer_key=ca_key, days=days, hosts=None)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = _certificate(hosts[0], server_key, issuer=ca.subject, issuer_key=ca_key,
                          days=days, hosts=hosts)
    write_bytes_atomic(creds.folder / CA_KEY, _pem_key(ca_key), mode=_PRIVATE)
    write_bytes_atomic(creds.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
    write_bytes_atomic(creds.server_key, _pem_key(server_key), mode=_PRIVATE)
    write_bytes_atomic(creds.server_cert, server.public_bytes(serialization.Encoding.PEM))
    for i in range(nodes):
        make_node_key(creds.node_key(i))
    return creds
