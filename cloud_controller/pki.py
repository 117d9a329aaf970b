"""The controller's small certificate authority (EC P-256, `cryptography`).

It issues each enrolled device an X.509 client certificate (CN = the device id, which Mosquitto
takes as the MQTT username: ``use_identity_as_username``), the broker its server certificate,
the controller's bridge its own client certificate (CN ``edgefleet-controller``), and keeps a
CRL of revoked device certificates.

The building and checking of certificates, CSRs and CRLs are pure functions (keys, names,
times in; objects out); `CertificateAuthority` is the file I/O at the edge: the CA's key and
certificate in ``<data dir>/pki/`` (key mode 0600), created once, and the CRL, written
atomically.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.wire import ids
from edgefleet.wire.atomic import atomic_write_bytes

CA_NAME = "edgefleet controller CA"
DEFAULT_DEVICE_DAYS = 90
DEFAULT_SERVER_DAYS = 825
CA_DAYS = 3650
CRL_DAYS = 30  # next_update: a broker that never reloads still sees a CRL this young
MAX_CSR_BYTES = 16 * 1024  # a P-256 CSR is about 400 bytes
# A certificate is valid from a little before it is issued, so that a device whose clock is a
# few minutes behind the controller's can still use it at once.
BACKDATE = timedelta(minutes=5)


class PkiError(ValueError):
    """A CSR, certificate or name the CA refuses; ``code`` is the reason code sent back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- pure: keys, names, certificates -------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_key_pem(data: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("key_invalid", "not an EC private key")
    return key


def load_cert_pem(data: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise PkiError("certificate_invalid", f"not a PEM certificate: {e}") from e


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def build_ca(
    key: ec.EllipticCurvePrivateKey, now: datetime, days: int = CA_DAYS, name: str = CA_NAME
) -> x509.Certificate:
    """A self-signed CA certificate that may sign end-entity certificates and CRLs only."""
    pub = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .sign(key, hashes.SHA256())
    )


def build_csr(key: ec.EllipticCurvePrivateKey, common_name: str) -> x509.CertificateSigningRequest:
    """The request a device sends at enrollment and renewal: its public key, CN = its id."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(common_name))
        .sign(key, hashes.SHA256())
    )


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def common_name(name: x509.Name) -> str | None:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        return None
    value = cns[0].value
    return value if isinstance(value, str) else None


def check_csr(pem: str | bytes, device_id: str) -> x509.CertificateSigningRequest:
    """The CSR when it is well formed, self-signed, for an EC P-256 key, with exactly one CN
    and nothing else in its subject, and that CN is ``device_id`` (which must itself match the
    device id grammar); else `PkiError` ``csr_invalid`` / ``csr_mismatch``."""
    data = pem.encode() if isinstance(pem, str) else pem
    if len(data) > MAX_CSR_BYTES:
        raise PkiError("csr_invalid", f"CSR over {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise PkiError("csr_invalid", f"not a PEM certificate request: {e}") from e
    if not csr.is_signature_valid:
        raise PkiError("csr_invalid", "the CSR's signature does not verify")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(pub.curve, ec.SECP256R1):
        raise PkiError("csr_invalid", "the CSR's key must be EC P-256")
    cn = common_name(csr.subject)
    if cn is None or len(csr.subject) != 1:
        raise PkiError("csr_invalid", "the CSR's subject must be one common name (CN)")
    ids.device_id(device_id)
    if cn != device_id:
        raise PkiError("csr_mismatch", f"the CSR is for {cn!r}, not for device {device_id!r}")
    return csr


def _ee_builder(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime,
    validity: timedelta,
    usage: x509.ObjectIdentifier,
    serial: int | None,
) -> x509.CertificateBuilder:
    not_after = min(now + validity, ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )


def issue_client(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime,
    validity: timedelta = timedelta(days=DEFAULT_DEVICE_DAYS),
    serial: int | None = None,
) -> x509.Certificate:
    """A TLS client certificate for ``subject`` (a device id, or the controller's user)."""
    return _ee_builder(
        ca_key, ca_cert, subject, public_key, now, validity, ExtendedKeyUsageOID.CLIENT_AUTH, serial
    ).sign(ca_key, hashes.SHA256())


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue_server(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    names: Sequence[str],
    now: datetime,
    validity: timedelta = timedelta(days=DEFAULT_SERVER_DAYS),
) -> x509.Certificate:
    """The broker's TLS server certificate; ``names`` (host names and IP addresses) become its
    subject alternative names, the first its CN."""
    if not names:
        raise PkiError("server_names_missing", "a server certificate needs at least one name")
    for n in names:
        if not n or any(c.isspace() or c in "/,*" for c in n) or len(n) > 253:
            raise PkiError("server_name_invalid", f"{n!r} is not a host name or IP address")
    return (
        _ee_builder(
            ca_key,
            ca_cert,
            names[0],
            public_key,
            now,
            validity,
            ExtendedKeyUsageOID.SERVER_AUTH,
            None,
        )
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def build_crl(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    revoked: Iterable[tuple[int, datetime]],
    now: datetime,
    days: int = CRL_DAYS,
) -> x509.CertificateRevocationList:
    """The CRL of ``revoked`` (serial, revoked at), signed by the CA."""
    b = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - BACKDATE)
        .next_update(now + timedelta(days=days))
    )
    for serial, at in sorted(set(revoked)):
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(at).build()
        )
    return b.sign(ca_key, hashes.SHA256())


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def verify_issued(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """`PkiError` ``certificate_invalid`` unless ``cert`` was signed by ``ca_cert``."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError) as e:
        raise PkiError("certificate_invalid", f"not issued by this CA: {e}") from e
    except Exception as e:  # InvalidSignature
        raise PkiError("certificate_invalid", "the certificate's signature does not verify") from e


def life_left(cert: x509.Certificate, now: datetime) -> float:
    """The fraction of the certificate's validity still ahead (1.0 new, 0.0 expired)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    total = (end - start).total_seconds()
    if total <= 0:
        return 0.0
    return max(0.0, min(1.0, (end - now).total_seconds() / total))


def needs_renewal(cert: x509.Certificate, now: datetime, threshold: float = 1 / 3) -> bool:
    """True when less than ``threshold`` of the certificate's life is left."""
    return life_left(cert, now) < threshold


# --- file I/O at the edge ------------------------------------------------------------------


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a secret atomically; the file is never readable by others on the way."""
    atomic_write_bytes(path, data, mode)


@dataclass
class CertificateAuthority:
    """The CA of one controller: ``<dir>/ca.key`` (0600), ``ca.crt``, ``crl.pem``."""

    dir: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_path(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def crl_path(self) -> Path:
        return self.dir / "crl.pem"

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    @classmethod
    def load_or_create(cls, directory: Path, now: datetime | None = None) -> CertificateAuthority:
        """The CA in ``directory``; a new key and self-signed certificate the first time."""
        key_path, crt_path = directory / "ca.key", directory / "ca.crt"
        if key_path.exists():
            key = load_key_pem(key_path.read_bytes())
            cert = load_cert_pem(crt_path.read_bytes())
            if cert.public_key() != key.public_key():
                raise PkiError("ca_mismatch", f"{crt_path} is not the certificate of {key_path}")
            return cls(directory, key, cert)
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key = new_key()
        cert = build_ca(key, now or datetime.now(UTC))
        write_private(key_path, key_pem(key))
        atomic_write_bytes(crt_path, cert_pem(cert))
        return cls(directory, key, cert)

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        now: datetime,
        validity: timedelta,
    ) -> x509.Certificate:
        pub = csr.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)  # check_csr refused any other
        cn = common_name(csr.subject)
        assert cn is not None
        return issue_client(self.key, self.cert, cn, pub, now, validity)

    def write_crl(self, revoked: Iterable[tuple[int, datetime]], now: datetime) -> bytes:
        """Regenerate the CRL and write it atomically (copies: `write_like`); its PEM."""
        data = crl_pem(build_crl(self.key, self.cert, revoked, now))
        atomic_write_bytes(self.crl_path, data)
        return data


def write_like(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically, keeping the mode and group the old file had."""
    try:
        st = path.stat()
    except FileNotFoundError:
        mode, gid = 0o644, None
    else:
        mode, gid = st.st_mode & 0o777, st.st_gid
    atomic_write_bytes(path, data, mode)
    if gid is not None and os.geteuid() == 0:
        os.chown(path, -1, gid)
