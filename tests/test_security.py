"""TLS between the services, the shared service token, and the gateway's bearer token."""
from __future__ import annotations

import datetime
import ipaddress

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from tests.conftest import new_stack
from tests.images import disk_png

SERVICE_TOKEN = "service-secret-123"
API_TOKEN = "api-secret-456"


def self_signed(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "orfeas-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secured")
    cert, key = self_signed(tmp)
    stack = new_stack(
        tmp,
        "secured",
        ORFEAS_TLS_CERT=str(cert),
        ORFEAS_TLS_KEY=str(key),
        ORFEAS_TLS_CA=str(cert),
        ORFEAS_SERVICE_TOKEN=SERVICE_TOKEN,
        GATEWAY_AUTH_TOKEN=API_TOKEN,
    )
    stack.start_all()
    yield stack, cert
    stack.stop_all()


def test_rest_needs_the_bearer_token_and_works_end_to_end_over_tls(secured):
    stack, _ = secured
    refused = httpx.get(f"{stack.gateway_url}/api/v1/generations")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "UNAUTHENTICATED"
    assert httpx.get(f"{stack.gateway_url}/healthz").status_code == 200
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    with httpx.Client(base_url=stack.gateway_url, headers=headers, timeout=60) as http:
        assert http.get("/readyz").json()["checks"]["generation"] == "serving"
        job = http.post(
            "/api/v1/generations",
            files={"image": ("d.png", disk_png(), "image/png")},
            data={"resolution": "96", "face_count": "2000", "texture_size": "256"},
        )
        assert job.status_code == 202, job.text
        with http.stream("GET", job.json()["links"]["events"]) as events:
            body = "".join(events.iter_text())
        assert "event: succeeded" in body
        assert http.get(job.json()["links"]["result"]).status_code == 200


def test_grpc_needs_tls_and_the_service_token(secured):
    stack, cert = secured
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(stack.generation_address, credentials) as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListGenerations(pb.ListGenerationsRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        listing = stub.ListGenerations(
            pb.ListGenerationsRequest(), timeout=10, metadata=[("authorization", f"Bearer {SERVICE_TOKEN}")]
        )
        assert listing is not None
    with grpc.insecure_channel(stack.generation_address) as plain:
        with pytest.raises(grpc.RpcError) as err:
            generation_pb2_grpc.GenerationServiceStub(plain).ListGenerations(pb.ListGenerationsRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
