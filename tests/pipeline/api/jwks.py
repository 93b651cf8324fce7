"""A real JWKS server on loopback and the identity provider it stands for, for the token tests."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.pipeline.api.helpers import b64url

PROVIDER_ISSUER = "https://idp.example.test/auth/v1"
PROVIDER_AUDIENCE = "sync-pipeline-api"
# As Supabase puts custom claims: under app_metadata (its top-level `role` is "authenticated").
CLAIMS = {
    "jwt_claim_company": "app_metadata.company_id",
    "jwt_claim_role": "app_metadata.role",
    "jwt_claim_employee": "app_metadata.employee_id",
}


@dataclass
class SigningKey:
    kid: str
    algorithm: str
    private: Any

    @classmethod
    def rsa(cls, kid: str) -> SigningKey:
        return cls(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))

    @classmethod
    def ec(cls, kid: str) -> SigningKey:
        return cls(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))

    def jwk(self) -> dict[str, Any]:
        algorithm = RSAAlgorithm if self.algorithm == "RS256" else ECAlgorithm
        public: dict[str, Any] = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**public, "kid": self.kid, "use": "sig", "alg": self.algorithm}

    def public_pem(self) -> bytes:
        pem: bytes = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, self.private, algorithm=self.algorithm, headers={"kid": self.kid, **header})


@dataclass
class JwksServer:
    """Serves ``keys`` as a JWKS document at ``url``; counts the fetches."""

    url: str
    keys: list[SigningKey] = field(default_factory=list)
    fetches: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, *keys: SigningKey) -> None:
        with self.lock:
            self.keys = list(keys)

    def document(self) -> bytes:
        with self.lock:
            self.fetches += 1
            return orjson.dumps({"keys": [key.jwk() for key in self.keys]})


@contextmanager
def jwks_server(*keys: SigningKey) -> Iterator[JwksServer]:
    holder: list[JwksServer] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = holder[0].document()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(JwksServer(url=f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json", keys=list(keys)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield holder[0]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def provider_claims(company_id: int | str | None, role: str | None = "manager", /, **overrides: Any) -> dict[str, Any]:
    """Claims as a provider writes them: the tenant under ``app_metadata``; ``None`` leaves one out."""
    now = int(time.time())
    metadata = {"company_id": company_id, "role": role, "employee_id": overrides.pop("employee_id", None)}
    claims: dict[str, Any] = {
        "sub": str(uuid.uuid4()),
        "iss": PROVIDER_ISSUER,
        "aud": PROVIDER_AUDIENCE,
        "iat": now,
        "exp": now + 600,
        "role": "authenticated",
        "app_metadata": {key: value for key, value in metadata.items() if value is not None},
    }
    claims.update(overrides)
    return {key: value for key, value in claims.items() if value is not None}


def hs256_with_public_key(key: SigningKey, claims: dict[str, Any]) -> str:
    """Algorithm confusion: an HS256 token whose HMAC secret is the provider's public key (PEM)."""
    signing_input = ".".join(
        [b64url(orjson.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid})), b64url(orjson.dumps(claims))]
    )
    signature = hmac.new(key.public_pem(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"
