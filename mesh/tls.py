"""TLS between the peers of a keyed mesh: a CA and one peer certificate derived from the mesh key
alone, so every holder of the key builds the same ones and nobody without it can present or verify
them. Mutual: a server requires the client's certificate too."""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Callable
from typing import Any, cast

import grpc
import grpc.aio
from google.protobuf.message import Message

from mesh.seal import REFUSAL

TLS_NAME = "together-mesh"  # the name in every peer's certificate; peers are dialled by IP
# P-256's group order: a private key is a number in [1, n)
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@functools.lru_cache(maxsize=8)
def tls_material(key: bytes) -> tuple[bytes, bytes, bytes]:
    """(CA certificate, peer key, peer certificate) as PEM, all derived from the mesh key alone: every
    holder of the key builds the same ones, and nobody without it can present or verify them."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def private(label: bytes) -> ec.EllipticCurvePrivateKey:
        seed = hmac.new(key, b"together-tls-v1|" + label, hashlib.sha512).digest()
        return ec.derive_private_key(int.from_bytes(seed, "big") % (_P256_ORDER - 1) + 1, ec.SECP256R1())

    ca_key, peer_key = private(b"ca"), private(b"peer")
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "together mesh CA")])
    utc = datetime.timezone.utc

    def cert(subject: x509.Name, public: ec.EllipticCurvePublicKey, ca: bool) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(public)
             .serial_number(2 - ca).not_valid_before(datetime.datetime(2000, 1, 1, tzinfo=utc))
             .not_valid_after(datetime.datetime(2100, 1, 1, tzinfo=utc))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
        if not ca:
            b = (b.add_extension(x509.SubjectAlternativeName([x509.DNSName(TLS_NAME)]), critical=False)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                       ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        return b.sign(ca_key, hashes.SHA256(), ecdsa_deterministic=True)

    pem = serialization.Encoding.PEM
    ca_cert = cert(ca_name, ca_key.public_key(), True)
    peer_cert = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)]), peer_key.public_key(), False)
    return (ca_cert.public_bytes(pem),
            peer_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            peer_cert.public_bytes(pem))


TLS_OPTIONS = (("grpc.ssl_target_name_override", TLS_NAME),)


def channel_credentials(mesh_key: str | bytes) -> grpc.ChannelCredentials:
    """The client side of the mesh's mutual TLS (use with TLS_OPTIONS; make_channel does both)."""
    key = mesh_key.encode() if isinstance(mesh_key, str) else bytes(mesh_key)
    if not key:
        raise ValueError("TLS between peers needs a non-empty mesh key")
    ca, peer_key, peer_cert = tls_material(key)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=peer_key, certificate_chain=peer_cert)


def add_port(server: grpc.aio.Server, address: str, mesh_key: str | bytes | None) -> int:
    """Listen on `address`: mutual TLS with the mesh key's certificates when a key is set (a peer
    without it cannot finish the handshake), plaintext otherwise. The port, 0 if it is taken."""
    key = (mesh_key.encode() if isinstance(mesh_key, str) else bytes(mesh_key)) if mesh_key else b""
    try:
        if not key:  # an empty key means no key, as everywhere
            return server.add_insecure_port(address)
        ca, peer_key, peer_cert = tls_material(key)
        creds = grpc.ssl_server_credentials([(peer_key, peer_cert)], root_certificates=ca, require_client_auth=True)
        return server.add_secure_port(address, creds)
    except RuntimeError:  # grpc's "Failed to bind": the port is taken (SO_REUSEPORT is off, mesh/auth.py)
        return 0


class ExplainRefusal(grpc.aio.UnaryUnaryClientInterceptor):
    """A TLS handshake that fails is a mesh-key mismatch, not a dead peer: say so, as the server's
    own refusal would (UNAUTHENTICATED naming the fix)."""

    def __init__(self, keyed: bool) -> None:
        self._keyed = keyed

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Message], grpc.aio.UnaryUnaryCall[Message, Message]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Message,
    ) -> Message:
        call = await cast(Any, continuation)(client_call_details, request)
        try:
            await call
        except grpc.aio.AioRpcError as e:
            why = e.details() or ""
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            if self._keyed and "andshake failed" in why:
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           f"{REFUSAL} (the TLS handshake failed: {why.rpartition('last error: ')[2]})",
                                           why) from None
            if not self._keyed and why.endswith("Socket closed") and "failed to connect" in why:
                # a TLS server hangs up on a plaintext hello: it holds a mesh key, this peer none
                raise grpc.aio.AioRpcError(grpc.StatusCode.UNAUTHENTICATED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           f"{REFUSAL} (the peer hung up at once: it expects TLS)", why) from None
            raise
        return cast(Message, call)
