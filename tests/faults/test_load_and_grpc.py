"""refscore `serve --worker` (transformers engine) in its own process, as deployed: gRPC over TLS with
team tokens and quotas (offdpo/grpc_auth). Many concurrent clients (Score and ScoreStream) with
deadlines, some of which expire, while pairs stream through the worker; a team over its quota while
another is served; callers without, with a wrong or with a too-narrow token; then malformed, random
and oversized requests over the authenticated channel. The server must answer with the documented
codes, never crash, and keep memory bounded."""

from __future__ import annotations

import collections
import statistics
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localdev.process import free_port
from offdpo.grpc_auth.auth import token_hash
from offdpo.refscore_client import RefscoreClient, channel_credentials, score_item
from offdpo.v1 import refscore_pb2
from tests.pairs import make_pairs
from tests.pki import make_cert

pytestmark = [pytest.mark.faults, pytest.mark.stack]

CLIENTS, REQUESTS_PER_CLIENT, DEADLINE_S = 16, 12, 10.0
STREAM_CLIENTS = 4  # of CLIENTS: these send their requests on one ScoreStream each
EXPIRING_DEADLINE_S = 0.001  # every third request of a unary client: expires before it can be served
TOKENS = {"load": "load-team-token", "quota": "quota-team-token", "info": "info-only-team-token"}
QUOTA_TOKENS_PER_MINUTE = 300  # small: a few requests spend it, and it refills at 5 tokens/s
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """The server's certificate (localhost) and the CA clients verify it against."""
    d = tmp_path_factory.mktemp("load-pki")
    ca, ca_key, ca_pem, _ = make_cert("load test CA", ca=True)
    _, _, cert_pem, key_pem = make_cert("refscore", ca, ca_key, server=True)
    for name, data in {"ca.crt": ca_pem, "tls.crt": cert_pem, "tls.key": key_pem}.items():
        (d / name).write_bytes(data)
    return d


def _auth_file(path):
    teams = {
        "load": {"token_sha256": [token_hash(TOKENS["load"])]},
        "quota": {"token_sha256": [token_hash(TOKENS["quota"])], "tokens_per_minute": QUOTA_TOKENS_PER_MINUTE},
        "info": {"token_sha256": [token_hash(TOKENS["info"])], "methods": ["GetModelInfo"]},
    }
    path.write_text(__import__("yaml").safe_dump({"teams": teams}))
    return path


@pytest.fixture(scope="module")
def served(stack, tiny_model, tmp_path_factory, pki):
    """One refscore serve --worker process for the load and gRPC fuzz cases, on its own topics, with
    TLS and team tokens on (no PLAINTEXT / ALLOW_ANONYMOUS escape hatch)."""
    from .harness import Case

    work = tmp_path_factory.mktemp("load")
    case = Case("load", stack, tiny_model, work, __import__("uuid").uuid4().hex[:10])
    port = free_port()
    env = {
        **case.env,
        "OFFDPO_REFSCORE_MODEL_DIR": str(tiny_model),
        "OFFDPO_REFSCORE_ENGINE": "transformers",
        "OFFDPO_REFSCORE_PORT": str(port),
        "OFFDPO_REFSCORE_METRICS_PORT": "0",
        "OFFDPO_REFSCORE_MAX_MODEL_LEN": "512",
        "OFFDPO_REFSCORE_BATCH_WAIT_S": "0.3",
        "OFFDPO_REFSCORE_BATCH_PAIRS": "16",
        "OFFDPO_REFSCORE_GRACE_S": "10",
        "OFFDPO_REFSCORE_TLS_CERT": str(pki / "tls.crt"),
        "OFFDPO_REFSCORE_TLS_KEY": str(pki / "tls.key"),
        "OFFDPO_REFSCORE_AUTH_FILE": str(_auth_file(work / "teams.yaml")),
    }
    for var in ("OFFDPO_REFSCORE_PLAINTEXT", "OFFDPO_REFSCORE_ALLOW_ANONYMOUS"):
        env.pop(var, None)
    server = case._spawn("refscore-serve", [sys.executable, "-m", "services.refscore", "serve", "--worker"], env)
    target = f"localhost:{port}"  # the name the certificate is for
    client = _client(target, pki, "load")
    try:
        try:
            client.wait_serving(timeout_s=180)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{server.tail()}") from None
        yield case, server, client, target
    finally:
        client.close()
        case.close()


def _client(target, pki, team: str | None) -> RefscoreClient:
    """A client over TLS (the server verified against the test CA) with `team`'s token (None: no token)."""
    return RefscoreClient(
        target, credentials=channel_credentials(str(pki / "ca.crt")), token=TOKENS[team] if team else None
    )


def _stream(client: RefscoreClient, requests, timeout: float):
    """All results of one ScoreStream call (requests sent one after another on the stream)."""
    return list(client.stub.ScoreStream(iter(requests), timeout=timeout))


def test_concurrent_clients_with_deadlines_while_the_stream_runs(served, pki, fault_results):
    case, server, client, target = served
    # warm-up, then the baseline RSS
    for _ in range(3):
        client.score([score_item([("user", "warm up")], "hello")], timeout=60)
    rss_warm = _rss_mib(server.proc.pid)
    pairs = make_pairs(64, case.run_name)
    case.produce_pairs(pairs)

    latencies, codes, lock = [], collections.Counter(), threading.Lock()

    expiring = collections.Counter()

    def items_for(i: int, j: int):
        return [
            score_item([("user", f"client {i} request {j}: say something")], f"answer {k} " * (1 + j % 5))
            for k in range(1 + (i + j) % 4)
        ]

    def one_client(i: int):
        with _client(target, pki, "load") as c:
            if i < STREAM_CLIENTS:  # all of its requests on one ScoreStream, under one deadline
                requests = [refscore_pb2.ScoreRequest(items=items_for(i, j)) for j in range(REQUESTS_PER_CLIENT)]
                t0 = time.perf_counter()
                try:
                    results = _stream(c, requests, timeout=DEADLINE_S * 6)
                    assert {r.request_index for r in results} == set(range(REQUESTS_PER_CLIENT))
                    assert len(results) == sum(len(r.items) for r in requests)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    codes[f"stream {code}"] += 1
                    latencies.append((time.perf_counter() - t0) * 1000 / REQUESTS_PER_CLIENT)
                return
            for j in range(REQUESTS_PER_CLIENT):
                expires = j % 3 == 2
                t0 = time.perf_counter()
                try:
                    c.score(items_for(i, j), timeout=EXPIRING_DEADLINE_S if expires else DEADLINE_S)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    if expires:
                        expiring[code] += 1
                    else:
                        latencies.append((time.perf_counter() - t0) * 1000)
                        codes[code] += 1

    threads = [threading.Thread(target=one_client, args=(i,), daemon=True) for i in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "client threads still running after 300 s"
    load_s = time.monotonic() - t0
    case.wait_scored(server, timeout_s=180)
    rss_after = _rss_mib(server.proc.pid)
    assert server.alive, server.tail()
    q = statistics.quantiles(latencies, n=100)
    errors = {k: v for k, v in codes.items() if k not in ("OK", "stream OK")}
    unary_clients = CLIENTS - STREAM_CLIENTS
    figures = {
        "transport": "TLS (server certificate verified), team bearer token",
        "clients": CLIENTS,
        "stream_clients": STREAM_CLIENTS,
        "requests": CLIENTS * REQUESTS_PER_CLIENT,
        # every request counted once: unary, each request on a stream, and the expiring ones
        "ok": codes["OK"] + codes["stream OK"] * REQUESTS_PER_CLIENT + expiring["OK"],
        "errors": {
            **{
                k.replace("stream ", "") + " (ScoreStream, whole stream)": v for k, v in errors.items() if "stream" in k
            },
            **{k: v for k, v in errors.items() if "stream" not in k},
            **{
                f"{k} ({EXPIRING_DEADLINE_S * 1000:g} ms deadline, expected)": v
                for k, v in expiring.items()
                if k != "OK"
            },
        },
        "streams_ok": codes["stream OK"],
        "expiring_deadline_s": EXPIRING_DEADLINE_S,
        "deadline_s": DEADLINE_S,
        "p50_ms": round(q[49], 1),
        "p95_ms": round(q[94], 1),
        "p99_ms": round(q[98], 1),
        "max_ms": round(max(latencies), 1),
        "wall_s": round(load_s, 1),
        "rss_warm_mib": round(rss_warm, 1),
        "rss_after_mib": round(rss_after, 1),
        "rss_growth": round(rss_after / rss_warm, 2),
        "stream_pairs": len(pairs),
        "stream_scored": len(set(case.scored_rows()) & {p.pair_id for p in pairs}),
        "engine": "transformers (CPU)",
    }
    fault_results.add_load(figures)
    expiring_per_client = sum(1 for j in range(REQUESTS_PER_CLIENT) if j % 3 == 2)
    assert sum(expiring.values()) == unary_clients * expiring_per_client
    assert sum(v for k, v in codes.items() if not k.startswith("stream")) == unary_clients * (
        REQUESTS_PER_CLIENT - expiring_per_client
    )
    assert sum(v for k, v in codes.items() if k.startswith("stream")) == STREAM_CLIENTS
    assert set(errors) <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "stream DEADLINE_EXCEEDED"}, errors
    # a deadline that expires is reported as such, never as another error (and costs the server nothing after)
    assert set(expiring) <= {"DEADLINE_EXCEEDED", "OK"} and expiring["DEADLINE_EXCEEDED"] > 0, expiring
    assert figures["stream_scored"] == len(pairs)
    assert rss_after < 1.5 * rss_warm, f"RSS grew from {rss_warm:.0f} to {rss_after:.0f} MiB"


def _raw(client, method: str, payload: bytes, timeout=30):
    call = client.channel.unary_unary(
        f"/offdpo.v1.RefScore/{method}", request_serializer=None, response_deserializer=None
    )
    return call(payload, timeout=timeout)


def _code(fn):
    try:
        fn()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def _trailer(exc: grpc.RpcError, key: str) -> str | None:
    return dict(exc.trailing_metadata() or ()).get(key)


def test_quotas_tokens_and_deadlines_over_tls(served, pki, fault_results):
    """A team over its tokens-per-minute quota is refused (with when to retry) on Score and on
    ScoreStream while another team is served; callers without a valid token, or with one for other
    methods, are refused; plaintext does not reach the TLS port; an expiring stream deadline is
    DEADLINE_EXCEEDED. The server stays up and keeps serving."""
    _, server, load, target = served
    seen: dict[str, str] = {}
    item = score_item([("user", "quota: spend some tokens")], "a few answer tokens " * 3)
    with _client(target, pki, "quota") as quota:
        admitted, refused = 0, None
        for _ in range(200):  # bounded: the quota is a few requests' worth
            try:
                quota.score([item], timeout=60)
                admitted += 1
            except grpc.RpcError as exc:
                refused = exc
                break
        assert refused is not None, f"200 requests admitted under a {QUOTA_TOKENS_PER_MINUTE} tokens/minute quota"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (refused.code(), refused.details())
        assert "quota" in refused.details() and int(_trailer(refused, "retry-after-ms") or 0) > 0
        assert admitted >= 1
        seen["quota: Score admitted before the refusal"] = str(admitted)
        # the other team is not affected
        assert len(load.score([item], timeout=60).items) == 1
        # the same team on a stream: refused on its first request, which the status names
        try:
            _stream(quota, [refscore_pb2.ScoreRequest(items=[item])] * 3, timeout=60)
            pytest.fail("a ScoreStream over the quota was served")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "request 0" in exc.details(), exc.details()
        seen["quota: ScoreStream"] = "RESOURCE_EXHAUSTED at request 0"

    refusals = {}
    with _client(target, pki, None) as anonymous, _client(target, pki, "info") as info:
        for what, call in (
            ("no token", lambda: anonymous.score([item], timeout=30)),
            ("info-only team: Score", lambda: info.score([item], timeout=30)),
            ("info-only team: ScoreStream", lambda: _stream(info, [refscore_pb2.ScoreRequest(items=[item])], 30)),
        ):
            refusals[what] = _code(call)[0].name
        assert info.model_info().fingerprint.fingerprint_id, "a method the team may call is served"
    wrong = RefscoreClient(target, credentials=channel_credentials(str(pki / "ca.crt")), token="not-a-team-token")
    with wrong:
        refusals["wrong token"] = _code(lambda: wrong.score([item], timeout=30))[0].name
    with RefscoreClient(target, token=TOKENS["load"]) as plaintext:
        refusals["plaintext to the TLS port"] = _code(lambda: plaintext.score([item], timeout=10))[0].name
    assert refusals == {
        "no token": "UNAUTHENTICATED",
        "info-only team: Score": "PERMISSION_DENIED",
        "info-only team: ScoreStream": "PERMISSION_DENIED",
        "wrong token": "UNAUTHENTICATED",
        "plaintext to the TLS port": "UNAVAILABLE",
    }, refusals

    # a stream whose deadline expires while it runs
    many = [refscore_pb2.ScoreRequest(items=[score_item([("user", f"stream {i}")], "answer " * 20)]) for i in range(40)]
    code, _ = _code(lambda: _stream(load, many, timeout=0.05))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, code
    refusals["ScoreStream with an expiring deadline"] = code.name

    assert len(load.score([item], timeout=60).items) == 1 and server.alive, server.tail()
    fault_results.add_fuzz(
        {**(fault_results.fuzz or {}), "gRPC auth and quota refusals (TLS on)": {**seen, **refusals}}
    )


def test_malformed_random_and_oversized_grpc_requests(served, fault_results):
    case, server, client, _ = served
    codes = collections.Counter()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(method=st.sampled_from(["Score", "Generate", "GetModelInfo"]), payload=st.binary(min_size=1, max_size=600))
    def random_bytes(method, payload):
        code, msg = _code(lambda: _raw(client, method, payload))
        codes[code.name] += 1
        assert code in ALLOWED | {grpc.StatusCode.OK}, f"{method} on {payload!r}: {code} {msg}"
        if code != grpc.StatusCode.OK:
            assert msg, "the status says what to fix"

    random_bytes()

    item = st.builds(
        lambda p, a, ids, use_ids: score_item(p, list(ids) if use_ids else a),
        st.text(max_size=80),
        st.text(max_size=80),
        st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20),
        st.booleans(),
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(items=st.lists(item, max_size=4), fp=st.text(max_size=20))
    def structured(items, fp):
        code, msg = _code(lambda: client.score(items, timeout=30, expected_fingerprint_id=fp))
        codes[code.name] += 1
        assert code in ALLOWED | {grpc.StatusCode.OK}, f"{items!r}: {code} {msg}"

    structured()

    # oversized: over the message limit (16 MiB), too many items, too many tokens
    over = refscore_pb2.ScoreRequest(items=[score_item("q", "x" * (17 * 1024 * 1024))]).SerializeToString()
    code, msg = _code(lambda: _raw(client, "Score", over, timeout=60))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, msg)
    code, msg = _code(lambda: client.score([score_item("q", [5])] * 1025))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, msg)
    code, msg = _code(lambda: _raw(client, "Score", b"\xff\xff\xff\xff\x0f"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in msg, (code, msg)
    code, msg = _code(lambda: client.score([score_item("q", "number " * 2000)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "context" in msg, (code, msg)

    # still healthy and answering
    assert (
        client.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert len(client.score([score_item([("user", "still there?")], "yes")], timeout=30).items) == 1
    assert server.alive, server.tail()
    fault_results.add_fuzz(
        {
            **(fault_results.fuzz or {}),
            "gRPC requests (random bytes + structured + oversized)": sum(codes.values()) + 4,
            "gRPC status codes seen": dict(sorted(codes.items())),
            "server after fuzzing": "SERVING, answers a valid Score",
        }
    )
