"""Test credentials made on the spot: a self-signed TLS certificate for 127.0.0.1, an RSA JWKS
with a signer for RS256 JWTs, API key files. Nothing here is a secret anywhere else."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID


def self_signed_cert(directory: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """cert.pem and key.pem for 127.0.0.1, and a client context that trusts only that cert."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "stream-relay test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(cafile=str(cert_path))
    return cert_path, key_path, context


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_int(value: int) -> str:
    return _b64url(value.to_bytes((value.bit_length() + 7) // 8, "big"))


Signer = Callable[[dict[str, object] | bytes], str]


def jwks_and_signer(directory: Path, *, kid: str = "test-key") -> tuple[Path, Signer]:
    """A JWKS file with one RSA public key, and a function that signs claims into an RS256 JWT
    (`exp` one hour ahead unless given; None leaves it out), or signs raw payload bytes."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.public_key().public_numbers()
    jwk = {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid}
    jwk |= {"n": _b64url_int(numbers.n), "e": _b64url_int(numbers.e)}
    path = directory / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))

    def sign(claims: dict[str, object] | bytes) -> str:
        header = _b64url(json.dumps({"alg": "RS256", "typ": "JWT", "kid": kid}).encode())
        if isinstance(claims, dict):
            claims = {"exp": int(time.time()) + 3600, **claims}
            payload = json.dumps({k: v for k, v in claims.items() if v is not None}).encode()
        else:
            payload = claims
        body = _b64url(payload)
        signing_input = f"{header}.{body}".encode()
        signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{header}.{body}.{_b64url(signature)}"

    return path, sign
