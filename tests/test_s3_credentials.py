"""offdpo/s3.py's credentials: static keys by default, else the AWS default chain, with temporary
credentials fetched again before they expire.

The rotation test runs minio's real IamAwsProvider against a credentials endpoint on loopback that speaks
EKS Pod Identity's protocol (AWS_CONTAINER_CREDENTIALS_FULL_URI + AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)
and the local SeaweedFS. SeaweedFS here has no STS of its own (`weed mini` with one static identity), so
the endpoint hands out that identity's keys as short-lived "session" credentials (a new expiry each
time; no session token, which SeaweedFS would refuse as one it did not issue): what is tested is our side (the fetch, the refresh before expiry, every request signed
with what the provider holds now), not an STS. A control in the same test makes the endpoint hand out a
wrong secret: the next refresh makes requests fail, so the client really uses the refreshed credentials.
"""

from __future__ import annotations

import dataclasses
import io
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from minio.credentials import Credentials, Provider, StaticProvider
from minio.error import S3Error

from offdpo import errors
from offdpo.config import DEV_ACCESS_KEY, DEV_SECRET_KEY, S3Config
from offdpo.s3 import CredentialsUnavailable, ObjectStore, RefreshingProvider, aws_default_chain, credentials_provider


class PodIdentityAgent:
    """A container credentials endpoint (EKS Pod Identity's protocol): GET with the projected token in
    Authorization -> JSON credentials. Counts what it issued; `secret` can be changed to break them."""

    def __init__(self, access_key: str, secret: str, lifetime_s: float, token: str = "projected-sa-token"):
        self.access_key, self.secret, self.lifetime_s, self.token = access_key, secret, lifetime_s, token
        self.issued = 0
        self.refused = 0
        # SeaweedFS refuses a session token it did not issue itself (InvalidAccessKeyId), so against it
        # the "session" credentials carry none (minio then sends no X-Amz-Security-Token).
        self.with_token = True
        self.down = False
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                if agent.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                if self.headers.get("Authorization") != agent.token:
                    agent.refused += 1
                    self.send_response(403)
                    self.end_headers()
                    return
                agent.issued += 1
                expires = datetime.now(UTC) + timedelta(seconds=agent.lifetime_s)
                body = json.dumps(
                    {
                        "AccessKeyId": agent.access_key,
                        "SecretAccessKey": agent.secret,
                        "Token": agent.session_token(agent.issued),
                        "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/credentials"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def session_token(self, n: int) -> str:
        return f"session-{n}" if self.with_token else ""

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def agent(tmp_path, monkeypatch):
    # Expiration is written to the second: 4 s leaves 3-4 s, the provider refreshes at half of it.
    a = PodIdentityAgent(DEV_ACCESS_KEY, DEV_SECRET_KEY, lifetime_s=4)
    token_file = tmp_path / "eks-pod-identity-token"
    token_file.write_text(a.token)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", a.url)
    monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token_file))
    yield a
    a.close()


def test_static_keys_stay_the_default():
    provider = credentials_provider(S3Config())
    assert isinstance(provider, StaticProvider)
    creds = provider.retrieve()
    assert (creds.access_key, creds.secret_key, creds.session_token) == (DEV_ACCESS_KEY, DEV_SECRET_KEY, None)


def test_an_empty_access_key_selects_the_aws_chain(agent):
    provider = credentials_provider(S3Config(access_key=""))
    assert isinstance(provider, RefreshingProvider)
    creds = provider.retrieve()
    assert creds.session_token == "session-1" and creds.expiration is not None
    assert agent.issued == 1


def test_web_identity_without_a_role_is_a_config_error(tmp_path):
    with pytest.raises(errors.ConfigError, match="AWS_ROLE_ARN"):
        aws_default_chain({"AWS_WEB_IDENTITY_TOKEN_FILE": str(tmp_path / "token")})


class _Flaky(Provider):
    """Hands out credentials valid for `lifetime_s`, or fails (as minio's providers do) when `fail`."""

    def __init__(self, state: dict):
        self.state = state

    def retrieve(self) -> Credentials:
        if self.state["fail"]:
            raise ValueError("http://169.254.170.23/v1/credentials failed with HTTP status code 500")
        self.state["n"] += 1
        expires = datetime.now(UTC) + timedelta(seconds=self.state["lifetime_s"])
        return Credentials("AK", "SK", f"token-{self.state['n']}", expires)


def test_refresh_happens_before_expiry_and_a_failed_refresh_keeps_valid_credentials():
    state = {"fail": False, "n": 0, "lifetime_s": 3600.0}
    provider = RefreshingProvider(lambda: _Flaky(state), margin_s=300)
    assert provider.retrieve().session_token == "token-1"
    assert provider.retrieve().session_token == "token-1", "cached while far from expiry"
    # 3600 s credentials are fetched again 300 s before they expire: pretend that time has come
    provider._refresh_at = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=1)
    assert provider.retrieve().session_token == "token-2"
    # the endpoint fails at the next refresh: the current credentials (still valid) are kept
    provider._refresh_at = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=1)
    state["fail"] = True
    assert provider.retrieve().session_token == "token-2"
    assert provider.fetches == 2


def test_expired_credentials_and_a_failing_endpoint_are_a_retryable_outage():
    state = {"fail": False, "n": 0, "lifetime_s": 0.4}  # refreshed 0.2 s before expiry
    provider = RefreshingProvider(lambda: _Flaky(state))
    provider.retrieve()
    state["fail"] = True
    time.sleep(0.3)
    with pytest.raises(CredentialsUnavailable, match="HTTP status code 500") as info:
        provider.retrieve()
    assert info.value.retryable


@pytest.mark.stack
def test_session_credentials_rotate_during_a_run_and_no_request_fails(stack, agent, unique):
    cfg = dataclasses.replace(stack.s3, access_key="", secret_key="")
    store = ObjectStore(cfg)
    client = store.client  # the plain client: no retries, so any request refused at a rotation fails here
    assert isinstance(store.credentials, RefreshingProvider)
    agent.with_token = False
    key = f"creds-test/{unique}/obj"
    requests = 0
    expirations = set()
    deadline = time.monotonic() + 7.0  # 3-4 s credentials, refreshed at half: >= 3 fetches
    while time.monotonic() < deadline:
        data = f"{requests}".encode()
        client.put_object(cfg.bucket, key, io.BytesIO(data), len(data))
        resp = client.get_object(cfg.bucket, key)
        try:
            assert resp.read() == data
        finally:
            resp.close()
            resp.release_conn()
        expirations.add(store.credentials.retrieve().expiration)
        requests += 2
        time.sleep(0.05)
    assert agent.issued == store.credentials.fetches >= 3, (agent.issued, store.credentials.fetches)
    assert len(expirations) >= 2 and agent.refused == 0
    assert requests > 20
    # Control: the endpoint now hands out a wrong secret. Once the current credentials are due, the
    # client signs with the new ones and SeaweedFS refuses: the requests above used what was fetched.
    agent.secret = "not-the-secret-of-this-identity"
    refused_at = None
    deadline = time.monotonic() + 6.0
    while time.monotonic() < deadline and refused_at is None:
        try:
            client.stat_object(cfg.bucket, key)
        except S3Error as exc:
            refused_at = exc.code
        time.sleep(0.1)
    assert refused_at in ("SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied"), refused_at
