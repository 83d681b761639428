"""offdpo-client (clients/python) without an engine: its generated modules match offdpo/v1, and its
retries, deadlines, token, batching and stream resumption behave as documented against a real gRPC
server in this process whose RefScore answers are scripted. tests/refscore/test_client_package.py
installs the wheel into a fresh environment and scores against the real refscore."""

from __future__ import annotations

import ast
import re
import sys
import threading
import tomllib
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "clients" / "python"
# The package from the checkout (the project's environment may not have it installed).
sys.path.insert(0, str(CLIENT / "src"))

import offdpo_client  # noqa: E402
from offdpo_client import NO_RETRY, RefscoreCallError, RefscoreClient, RetryPolicy  # noqa: E402
from offdpo_client.v1 import records_pb2, refscore_pb2, refscore_pb2_grpc  # noqa: E402

GENERATED = ["records_pb2.py", "refscore_pb2.py"]


# -- the package itself ---------------------------------------------------------------------------------
def _serialized_descriptor(path: Path) -> bytes:
    match = re.search(r"AddSerializedFile\((b'.*?')\)\n", path.read_text())
    assert match, f"{path} has no serialized descriptor"
    return ast.literal_eval(match.group(1))


@pytest.mark.parametrize("name", GENERATED)
def test_generated_modules_carry_offdpo_v1s_descriptors(name):
    ours = _serialized_descriptor(CLIENT / "src/offdpo_client/v1" / name)
    assert ours == _serialized_descriptor(REPO / "offdpo/v1" / name), (
        f"offdpo_client/v1/{name} is stale: run `python3 clients/python/generate_protos.py`"
    )


def _rpcs(path: Path) -> list[tuple[str, str, str, str]]:
    """(kind, path, request, response) of each method the generated stub calls."""
    found = re.findall(
        r"self\.(\w+) = channel\.(\w+)\(\s*'([^']+)',\s*request_serializer=\w+\.(\w+)\.SerializeToString,"
        r"\s*response_deserializer=\w+\.(\w+)\.FromString",
        path.read_text(),
    )
    return [(kind, rpc_path, req, resp) for _, kind, rpc_path, req, resp in found]


def test_generated_stub_and_type_stubs_match_offdpo_v1():
    ours = _rpcs(CLIENT / "src/offdpo_client/v1/refscore_pb2_grpc.py")
    assert len(ours) == 4 and ours == _rpcs(REPO / "offdpo/v1/refscore_pb2_grpc.py")
    # The type stubs: the same classes with the same fields (the two protoc versions spell some
    # parameter types differently, e.g. `bool` and `_Optional[bool]`).
    for stub in ("records_pb2.pyi", "refscore_pb2.pyi"):
        ours_stub = _classes_and_slots(CLIENT / "src/offdpo_client/v1" / stub)
        assert ours_stub and ours_stub == _classes_and_slots(REPO / "offdpo/v1" / stub), f"{stub} is stale"


def _classes_and_slots(path: Path) -> list[str]:
    return re.findall(r"^\s*(class \w+|__slots__ = .*)$", path.read_text(), flags=re.M)


def test_the_stale_check_can_fail(tmp_path):
    edited = tmp_path / "records_pb2.py"
    text = (CLIENT / "src/offdpo_client/v1/records_pb2.py").read_text()
    edited.write_text(text.replace("ChatMessage", "ChatMessagE", 1))
    assert _serialized_descriptor(edited) != _serialized_descriptor(REPO / "offdpo/v1/records_pb2.py")


def test_only_grpcio_and_protobuf_ranges_and_the_projects_version_and_licence():
    client = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    root = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert client["requires-python"] == ">=3.9"
    names = {re.split(r"[<>=!~ ]", dep, maxsplit=1)[0] for dep in client["dependencies"]}
    assert names == {"grpcio", "protobuf"}
    assert all("==" not in dep and "<" in dep for dep in client["dependencies"])
    assert offdpo_client.__version__ == root["version"]
    assert (CLIENT / "LICENSE").read_bytes() == (REPO / "LICENSE").read_bytes()
    # The lower bounds are what the generated modules check at import.
    grpc_module = (CLIENT / "src/offdpo_client/v1/refscore_pb2_grpc.py").read_text()
    grpc_floor = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", grpc_module).group(1)
    assert f"grpcio>={grpc_floor},<2" in client["dependencies"]
    gencode = re.search(
        r"Protobuf Python Version: ([\d.]+)", (CLIENT / "src/offdpo_client/v1/refscore_pb2.py").read_text()
    )
    assert f"protobuf>={gencode.group(1)},<8" in client["dependencies"]


# -- a real gRPC server whose answers the tests script ------------------------------------------------
def _fingerprint(fid: str) -> records_pb2.ReferenceFingerprint:
    return records_pb2.ReferenceFingerprint(fingerprint_id=fid, model_id="m", dtype="float32", engine="scripted")


def _scored(index: int, item: refscore_pb2.ScoreItem) -> refscore_pb2.ScoredItem:
    # Deterministic values from the item, so a test can tell every item's result apart.
    ids = list(item.answer_token_ids.ids) or [len(item.answer_text)]
    return refscore_pb2.ScoredItem(
        item_index=index,
        item_id=item.item_id,
        prompt_token_ids=[1, 2],
        answer_token_ids=ids,
        token_logprobs=[-0.5 * i for i in ids],
        logprob_sum=sum(-0.5 * i for i in ids),
    )


class Scripted(refscore_pb2_grpc.RefScoreServicer):
    """`failures`: (code, retry-after-ms or None) answered by the next calls before they succeed."""

    def __init__(self):
        self.failures: list[tuple[grpc.StatusCode, str | None]] = []
        self.calls: list[tuple[str, refscore_pb2.ScoreRequest | None, dict]] = []
        self.stream_fail_after: int | None = None  # the first stream fails after this many results
        self.lock = threading.Lock()

    def _fail_if_scripted(self, context) -> None:
        with self.lock:
            failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            code, hint = failure
            if hint is not None:
                context.set_trailing_metadata((("retry-after-ms", hint),))
            context.abort(code, f"scripted {code.name}")

    def Score(self, request, context):
        self.calls.append(("Score", request, dict(context.invocation_metadata())))
        self._fail_if_scripted(context)
        return refscore_pb2.ScoreResponse(
            items=[_scored(i, item) for i, item in enumerate(request.items)],
            fingerprint=_fingerprint(request.expected_fingerprint_id or "fp-a"),
        )

    def ScoreStream(self, request_iterator, context):
        self.calls.append(("ScoreStream", None, dict(context.invocation_metadata())))
        self._fail_if_scripted(context)
        sent = 0
        for r, request in enumerate(request_iterator):
            # Results in reverse order within a request: the client must not rely on order.
            for i in reversed(range(len(request.items))):
                if self.stream_fail_after is not None and sent == self.stream_fail_after:
                    self.stream_fail_after = None
                    context.abort(grpc.StatusCode.UNAVAILABLE, "scripted: replica going away")
                result = refscore_pb2.ScoreStreamResult(request_index=r, item=_scored(i, request.items[i]))
                if sent == 0:
                    result.fingerprint.CopyFrom(_fingerprint(request.expected_fingerprint_id or "fp-a"))
                sent += 1
                yield result

    def GetModelInfo(self, request, context):
        self._fail_if_scripted(context)
        return refscore_pb2.ModelInfo(fingerprint=_fingerprint("fp-a"), max_items_per_request=3)


@pytest.fixture
def server():
    scripted = Scripted()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    refscore_pb2_grpc.add_RefScoreServicer_to_server(scripted, grpc_server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    scripted.target = f"127.0.0.1:{port}"
    yield scripted
    grpc_server.stop(0)


def _client(server, **kw) -> tuple[RefscoreClient, list[float]]:
    slept: list[float] = []
    return RefscoreClient(server.target, sleep=slept.append, **kw), slept


ITEMS = [("q", "a"), ([("user", "hi")], [5, 6, 7]), ("p", "longer answer")]


def test_typed_results_and_the_token_on_a_plaintext_channel(server):
    client, _ = _client(server, token="team-token")
    result = client.score(ITEMS)
    assert [i.index for i in result.items] == [0, 1, 2]
    assert result.items[1].answer_token_ids == (5, 6, 7)
    assert result.items[1].token_logprobs == (-2.5, -3.0, -3.5)
    assert result.fingerprint.fingerprint_id == "fp-a" and result.items[0].fingerprint == result.fingerprint
    assert server.calls[0][2]["authorization"] == "Bearer team-token"
    client.wait_serving(timeout_s=10)


def test_unavailable_is_retried_with_growing_backoff(server):
    server.failures = [(grpc.StatusCode.UNAVAILABLE, None)] * 3
    client, slept = _client(server, retry=RetryPolicy(initial_backoff_s=1.0, multiplier=2.0))
    assert len(client.score(ITEMS).items) == 3
    assert len(server.calls) == 4 and len(slept) == 3
    # Backoff n is within [half, all] of 1, 2, 4 s.
    assert 0.5 <= slept[0] <= 1 and 1 <= slept[1] <= 2 and 2 <= slept[2] <= 4


def test_resource_exhausted_waits_the_servers_hint(server):
    server.failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, "1250")]
    client, slept = _client(server)
    assert len(client.score(ITEMS).items) == 3
    assert slept == [1.25]


def test_resource_exhausted_without_a_hint_is_not_retried(server):
    # Over the size limits, more tokens than the quota holds: waiting cannot help.
    server.failures = [(grpc.StatusCode.RESOURCE_EXHAUSTED, None)]
    client, slept = _client(server)
    with pytest.raises(RefscoreCallError) as info:
        client.score(ITEMS)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and isinstance(info.value, grpc.RpcError)
    assert slept == [] and len(server.calls) == 1


def test_no_retry_outlives_the_deadline_or_the_attempts(server):
    server.failures = [(grpc.StatusCode.UNAVAILABLE, "5000")]
    client, slept = _client(server)
    with pytest.raises(RefscoreCallError) as info:
        client.score(ITEMS, timeout=2.0)  # the hint (5 s) is past the deadline: fail now
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and info.value.retry_after_s == 5.0 and slept == []
    server.failures = [(grpc.StatusCode.UNAVAILABLE, None)] * 3
    client, slept = _client(server, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(RefscoreCallError, match="after 3 attempts"):
        client.score(ITEMS)
    assert len(slept) == 2
    server.failures = [(grpc.StatusCode.UNAVAILABLE, None)]
    client, slept = _client(server, retry=NO_RETRY)
    with pytest.raises(RefscoreCallError):
        client.score(ITEMS)


def test_score_many_batches_keeps_order_and_pins_the_first_fingerprint(server):
    client, _ = _client(server)
    items = [("q", [i + 1]) for i in range(8)]
    results = client.score_many(items, max_in_flight=2)  # batch size: the server's max_items_per_request (3)
    assert [r.index for r in results] == list(range(8))
    assert [r.answer_token_ids for r in results] == [(i + 1,) for i in range(8)]
    requests = [call[1] for call in server.calls if call[0] == "Score"]
    assert sorted(len(r.items) for r in requests) == [2, 3, 3]
    assert requests[0].expected_fingerprint_id == ""
    assert all(r.expected_fingerprint_id == "fp-a" for r in requests[1:])


def test_score_stream_resumes_after_a_failure_without_repeating_items(server):
    server.stream_fail_after = 4  # items 2, 1, 0 of request 0, then item 5 of request 1: then UNAVAILABLE
    client, slept = _client(server)
    items = [("q", [i + 1]) for i in range(7)]
    results = list(client.score_stream(items, batch_size=3))
    assert sorted(r.index for r in results) == list(range(7))  # each once
    assert all(r.answer_token_ids == (r.index + 1,) for r in results)
    assert len(slept) == 1 and [c[0] for c in server.calls] == ["ScoreStream", "ScoreStream"]
    assert all(r.fingerprint.fingerprint_id == "fp-a" for r in results)
