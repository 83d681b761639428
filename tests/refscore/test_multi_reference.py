"""One refscore server serving two reference models at once (OFFDPO_REFSCORE_EXTRA_MODEL_DIRS).

Model A is the session's tiny test model (the primary, OFFDPO_REFSCORE_MODEL_DIR); model B has the same
architecture and tokenizer and other random weights (seed 1), so another fingerprint. One in-process
RefscoreServer built from that configuration serves both; its answers are compared with each model's
own Scorer, loaded separately. The transformers engine throughout (no vLLM engine beside the package's
shared one); the vLLM memory bound is checked as a unit, without an engine.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading

import grpc
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from localdev.process import free_port
from offdpo.config import ConfigError
from offdpo.refscore_client import RefscoreClient, score_item
from offdpo.v1 import refscore_pb2
from services.refscore import security
from services.refscore.config import RefscoreConfig, check_reference_memory
from services.refscore.errors import DuplicateReference
from services.refscore.scorer import Scorer
from services.refscore.server import RefscoreServer

WAIT_S = 60  # bound on every RPC here: a hang fails with DEADLINE_EXCEEDED, not a stuck run
UNKNOWN_ID = "0123456789abcdef"
ITEMS = [
    score_item([("user", "What is 2+2?")], "4", item_id="chat"),
    score_item("The capital of France is", " Paris, a city on the Seine.", item_id="text"),
    score_item([("system", "Be brief."), ("user", "Name a colour.")], "Blue, like the sky.", item_id="chat2"),
]


def _cfg(model_dir, **kw) -> RefscoreConfig:
    base = dict(
        model_dir=str(model_dir),
        engine="transformers",
        max_model_len=512,
        host="127.0.0.1",
        port=free_port(),
        metrics_port=0,
        plaintext=True,
        allow_anonymous=True,
    )
    return RefscoreConfig(**{**base, **kw})


class ThreadServer:
    """A RefscoreServer on an event loop in a background thread; `close` always stops it (with its
    scorers unless `keep_scorers`: scorers a test passed in and shares)."""

    def __init__(self, server: RefscoreServer, load: bool = True, keep_scorers: bool = False):
        self.server = server
        self.keep_scorers = keep_scorers
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-refscore-loop", daemon=True)
        self.thread.start()
        try:
            self.port = self.run(server.start())
            if load:
                self.run(server.load_engine())
        except BaseException:
            self.close()
            raise
        self.target = f"127.0.0.1:{self.port}"

    def run(self, coro, timeout: float = 180):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def stop():
            if self.keep_scorers:
                for s in (self.server.server, self.server.health_server):
                    if s is not None:
                        await s.stop(0)
            else:
                await self.server.stop(0)

        try:
            self.run(stop(), timeout=90)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S).status
        )


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def _loaded(model_dir) -> Scorer:
    scorer = Scorer(_cfg(model_dir))
    scorer.load()
    return scorer


@pytest.fixture(scope="module")
def scorer_a(tiny_model):
    scorer = _loaded(tiny_model)
    yield scorer
    scorer.shutdown()


@pytest.fixture(scope="module")
def scorer_b(model_b):
    scorer = _loaded(model_b)
    yield scorer
    scorer.shutdown()


@pytest.fixture(scope="module")
def fp_a(scorer_a):
    return scorer_a.model().fingerprint


@pytest.fixture(scope="module")
def fp_b(scorer_b):
    return scorer_b.model().fingerprint


@pytest.fixture(scope="module")
def two_models(tiny_model, model_b):
    """One server, configured like a pod: OFFDPO_REFSCORE_MODEL_DIR=A, OFFDPO_REFSCORE_EXTRA_MODEL_DIRS=B."""
    from_env = RefscoreConfig.from_env({"OFFDPO_REFSCORE_EXTRA_MODEL_DIRS": str(model_b)})
    assert from_env.extra_model_dirs == (str(model_b),)
    cfg = _cfg(tiny_model, extra_model_dirs=from_env.extra_model_dirs)
    server = ThreadServer(RefscoreServer(cfg, replicas=1))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def client(two_models):
    with RefscoreClient(two_models.target) as c:
        yield c


def _direct(scorer: Scorer) -> list[list[float]]:
    """What the model's own Scorer gives for ITEMS (one engine call, as the server makes)."""
    return scorer.score(scorer.prepare_items(ITEMS), timeout=WAIT_S)


def _assert_same_scores(resp_items, expected: list[list[float]]) -> None:
    assert len(resp_items) == len(expected)
    for item, want in zip(resp_items, expected):
        got = np.asarray(item.token_logprobs, dtype=np.float32)
        want32 = np.asarray(want, dtype=np.float32)
        assert got.shape == want32.shape, item.item_id
        np.testing.assert_allclose(got, want32, rtol=0, atol=1e-6, err_msg=item.item_id)


# -- serving two models ---------------------------------------------------------------------------------
def test_score_picks_the_model_by_fingerprint(client, scorer_a, scorer_b, fp_a, fp_b):
    assert fp_a.fingerprint_id != fp_b.fingerprint_id
    direct_a, direct_b = _direct(scorer_a), _direct(scorer_b)
    # The two models really score differently, so picking the wrong one could not pass unseen.
    assert not np.allclose(np.concatenate(direct_a), np.concatenate(direct_b), atol=1e-3)
    for fp, direct in ((fp_a, direct_a), (fp_b, direct_b)):
        resp = client.score(ITEMS, timeout=WAIT_S, expected_fingerprint_id=fp.fingerprint_id)
        assert resp.fingerprint == fp
        assert [i.item_id for i in resp.items] == ["chat", "text", "chat2"]
        _assert_same_scores(resp.items, direct)


def test_an_empty_fingerprint_is_the_primary(client, scorer_a, fp_a):
    resp = client.score(ITEMS, timeout=WAIT_S)
    assert resp.fingerprint == fp_a
    _assert_same_scores(resp.items, _direct(scorer_a))


def test_score_stream_requests_pick_their_model(client, scorer_a, scorer_b, fp_a, fp_b):
    wanted = [fp_b, fp_a, fp_a, fp_b]
    requests = [refscore_pb2.ScoreRequest(items=ITEMS, expected_fingerprint_id=fp.fingerprint_id) for fp in wanted]
    results = list(client.stub.ScoreStream(iter(requests), timeout=WAIT_S))
    direct = {fp_a.fingerprint_id: _direct(scorer_a), fp_b.fingerprint_id: _direct(scorer_b)}
    for index, fp in enumerate(wanted):
        mine = [r for r in results if r.request_index == index]
        _assert_same_scores([r.item for r in mine], direct[fp.fingerprint_id])
        # The fingerprint comes with the stream's first result and wherever the model changes.
        changed = index == 0 or wanted[index - 1] != fp
        assert [r.HasField("fingerprint") for r in mine] == [changed] + [False] * (len(mine) - 1)
        if changed:
            assert mine[0].fingerprint == fp


def test_an_unknown_fingerprint_is_failed_precondition_naming_the_served_ones(client, fp_a, fp_b):
    calls = {
        "Score": lambda: client.score(ITEMS, timeout=WAIT_S, expected_fingerprint_id=UNKNOWN_ID),
        "ScoreStream": lambda: list(
            client.stub.ScoreStream(
                iter([refscore_pb2.ScoreRequest(items=ITEMS, expected_fingerprint_id=UNKNOWN_ID)]), timeout=WAIT_S
            )
        ),
        "Generate": lambda: client.generate("Hello", max_tokens=4, timeout=WAIT_S, expected_fingerprint_id=UNKNOWN_ID),
        "GetModelInfo": lambda: client.model_info(timeout=WAIT_S, fingerprint_id=UNKNOWN_ID),
    }
    for method, call in calls.items():
        err = _error(call)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (method, err.details())
        details = err.details()
        assert UNKNOWN_ID in details, method
        for fp in (fp_a, fp_b):
            assert fp.fingerprint_id in details and fp.model_id in details, (method, details)


def test_generate_with_b_is_generated_by_b(client, scorer_a, scorer_b, fp_a, fp_b):
    resp = client.generate(
        [("user", "Say something.")],
        n=1,  # greedy (temperature 0): the transformers engine samples one answer per greedy request
        max_tokens=8,
        temperature=0.0,
        seed=0,
        timeout=WAIT_S,
        expected_fingerprint_id=fp_b.fingerprint_id,
    )
    assert resp.fingerprint == fp_b
    assert len(resp.answers) == 1 and resp.answers[0].token_ids
    # The sampled tokens' log-probs are B's: scoring the greedy answer with B's own Scorer gives them back.
    answer = list(resp.answers[0].token_ids)
    prepared = scorer_b.prepare_items([score_item([("user", "Say something.")], answer)])
    assert prepared[0].answer_ids == answer
    (direct,) = scorer_b.score(prepared, timeout=WAIT_S)
    np.testing.assert_allclose(resp.answers[0].token_logprobs, direct, rtol=0, atol=1e-4)
    (under_a,) = scorer_a.score(scorer_a.prepare_items([score_item([("user", "Say something.")], answer)]), WAIT_S)
    assert not np.allclose(resp.answers[0].token_logprobs, under_a, atol=1e-3)  # not A's
    assert client.generate("Hi", max_tokens=4, timeout=WAIT_S).fingerprint == fp_a  # empty: the primary


def test_model_info_lists_every_served_model(client, scorer_b, fp_a, fp_b):
    primary = client.model_info(timeout=WAIT_S)
    assert primary.fingerprint == fp_a
    assert list(primary.served) == [fp_a, fp_b]  # the primary first
    info_b = client.model_info(timeout=WAIT_S, fingerprint_id=fp_b.fingerprint_id)
    assert info_b.fingerprint == fp_b
    assert list(info_b.served) == [fp_a, fp_b]
    assert dict(info_b.engine_settings) == scorer_b.engine_settings


def test_health_is_serving_with_both_loaded(two_models):
    assert _health(two_models.target) == health_pb2.HealthCheckResponse.SERVING
    assert [s.ready.is_set() for s in two_models.server.scorers] == [True, True]


# -- loading ---------------------------------------------------------------------------------------------
def test_serving_only_once_every_model_has_loaded(tiny_model, model_b, scorer_a, scorer_b, fp_a, fp_b, caplog):
    """The primary is loaded, B not yet: health NOT_SERVING and a request naming B is UNAVAILABLE
    (retryable: B's fingerprint is not known until it loads), not FAILED_PRECONDITION."""
    unloaded_b = Scorer(_cfg(model_b))
    server = ThreadServer(
        RefscoreServer(_cfg(tiny_model), scorer_a, replicas=1, extra_scorers=[unloaded_b]),
        load=False,
        keep_scorers=True,
    )
    try:
        assert _health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with RefscoreClient(server.target) as c:
            err = _error(lambda: c.score(ITEMS, timeout=WAIT_S, expected_fingerprint_id=fp_b.fingerprint_id))
            assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
            caplog.set_level(logging.INFO, logger="services.refscore.server")
            server.run(server.server.load_engine())
            assert _health(server.target) == health_pb2.HealthCheckResponse.SERVING
            loaded = [r.getMessage() for r in caplog.records if "reference model" in r.getMessage()]
            assert len(loaded) == 2, loaded  # one line per model, with its fingerprint
            assert loaded[0].startswith("reference model 1/2 loaded (primary)") and fp_a.fingerprint_id in loaded[0]
            assert loaded[1].startswith("reference model 2/2 loaded") and fp_b.fingerprint_id in loaded[1]
            resp = c.score(ITEMS, timeout=WAIT_S, expected_fingerprint_id=fp_b.fingerprint_id)
            assert resp.fingerprint == fp_b
            _assert_same_scores(resp.items, _direct(scorer_b))
    finally:
        server.close()
        unloaded_b.shutdown()


def test_two_models_with_one_fingerprint_refuse_to_serve(tiny_model, tmp_path):
    copy = shutil.copytree(tiny_model, tmp_path / "copy" / tiny_model.name)  # same files, same name: same fingerprint
    server = ThreadServer(RefscoreServer(_cfg(tiny_model, extra_model_dirs=(str(copy),)), replicas=1), load=False)
    try:
        with pytest.raises(DuplicateReference, match="same fingerprint") as info:
            server.run(server.server.load_engine())
        assert str(tiny_model) in str(info.value) and str(copy) in str(info.value)
        assert isinstance(info.value, ConfigError)
        assert _health(server.target) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.close()


# -- auth: a team limited to some models -------------------------------------------------------------------
def test_a_team_limited_to_b_may_use_b_only(tiny_model, scorer_a, scorer_b, fp_a, fp_b, tmp_path):
    token = "tok-only-b-0123456789abcdef0123456789"
    auth = tmp_path / "teams.yaml"
    auth.write_text(
        yaml.safe_dump({"teams": {"only-b": {"token_sha256": [security.token_hash(token)], "models": [fp_b.model_id]}}})
    )
    cfg = _cfg(tiny_model, allow_anonymous=False, auth_file=str(auth))
    server = ThreadServer(RefscoreServer(cfg, scorer_a, replicas=1, extra_scorers=[scorer_b]), keep_scorers=True)
    try:
        with RefscoreClient(server.target, token=token) as c:
            assert c.score(ITEMS, timeout=WAIT_S, expected_fingerprint_id=fp_b.fingerprint_id).fingerprint == fp_b
            assert c.model_info(timeout=WAIT_S, fingerprint_id=fp_b.fingerprint_id).fingerprint == fp_b
            for call in (
                lambda: c.score(ITEMS, timeout=WAIT_S),  # the primary, A
                lambda: c.score(ITEMS, timeout=WAIT_S, expected_fingerprint_id=fp_a.fingerprint_id),
                lambda: c.generate("Hi", max_tokens=4, timeout=WAIT_S),
                lambda: c.model_info(timeout=WAIT_S),
            ):
                err = _error(call)
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
                assert fp_a.model_id in err.details() and "only-b" in err.details()
    finally:
        server.close()


# -- configuration (no engine) -------------------------------------------------------------------------------
def test_no_extra_model_dirs_keeps_one_scorer(tiny_model):
    cfg = RefscoreConfig.from_env(
        {"OFFDPO_REFSCORE_MODEL_DIR": str(tiny_model), "OFFDPO_REFSCORE_EXTRA_MODEL_DIRS": ""}, engine="transformers"
    )
    assert cfg.extra_model_dirs == ()
    assert cfg.model_configs() == [cfg]
    server = RefscoreServer(cfg, replicas=1)  # not started: nothing loads
    assert len(server.scorers) == 1 and server.scorer.cfg is cfg


def test_extra_models_get_the_same_engine_settings_and_their_own_model_id():
    cfg = RefscoreConfig.from_env(
        {"OFFDPO_REFSCORE_EXTRA_MODEL_DIRS": " models/b , s3://bucket/runs/r/checkpoints/step-5/model/ ,"},
        model_dir="models/a",
        model_id="the-primary",
        engine="transformers",
        dtype="bfloat16",
        max_model_len=1024,
    )
    primary, b, c = cfg.model_configs()
    assert primary is cfg
    assert (b.model_dir, c.model_dir) == ("models/b", "s3://bucket/runs/r/checkpoints/step-5/model/")
    for extra in (b, c):
        assert extra.model_id == "" and extra.extra_model_dirs == ()
        assert (extra.engine, extra.dtype, extra.max_model_len) == ("transformers", "bfloat16", 1024)
        assert extra.engine_settings() == cfg.engine_settings()


def test_the_vllm_memory_bound_refuses_three_times_0_4():
    cfg = RefscoreConfig(
        model_dir="models/a", extra_model_dirs=("models/b", "models/c"), engine="vllm", gpu_memory_utilization=0.4
    )
    for on_gpu in (True, False):
        with pytest.raises(ConfigError) as info:
            check_reference_memory(cfg, on_gpu=on_gpu)
        message = str(info.value)
        assert "OFFDPO_REFSCORE_GPU_MEMORY_UTILIZATION=0.4" in message
        assert "OFFDPO_REFSCORE_EXTRA_MODEL_DIRS" in message and "1.20" in message and "0.31" in message
    with pytest.raises(ConfigError):
        cfg.model_configs(on_gpu=True)  # what RefscoreServer and `serve` call at start-up
    # Within the bound: two models at 0.4; three at 0.31.
    check_reference_memory(RefscoreConfig(extra_model_dirs=("models/b",), engine="vllm", gpu_memory_utilization=0.4))
    check_reference_memory(
        RefscoreConfig(extra_model_dirs=("models/b", "models/c"), engine="vllm", gpu_memory_utilization=0.31)
    )
    # The transformers engine reserves nothing up front: no bound.
    check_reference_memory(
        RefscoreConfig(extra_model_dirs=("models/b", "models/c"), engine="transformers", gpu_memory_utilization=0.4)
    )


def test_the_vllm_default_fraction_is_per_device():
    two = RefscoreConfig(extra_model_dirs=("models/b",), engine="vllm")  # GPU_MEMORY_UTILIZATION 0: the default
    with pytest.raises(ConfigError, match="0.9 on a GPU"):
        check_reference_memory(two, on_gpu=True)  # 2 x 0.9: a second model needs the setting lowered
    check_reference_memory(two, on_gpu=False)  # 2 x 0.15 of host RAM
    one = RefscoreConfig(engine="vllm")
    check_reference_memory(one, on_gpu=True)  # one model: today's behaviour, whatever the fraction


def test_the_same_model_twice_is_refused_at_start_up():
    with pytest.raises(ConfigError, match="listed twice"):
        RefscoreConfig(model_dir="models/a", extra_model_dirs=("models/b", "models/a/")).model_configs()


# -- `serve --worker` ------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_serve_with_worker_gives_the_worker_every_model_primary_first(tiny_model, model_b, monkeypatch, caplog):
    """With extra models, `serve --worker` hands the stream worker the primary's scorer (pairs naming no
    reference) and the extra ones (pairs naming them: tests/refscore/test_worker_routing.py)."""
    from services.refscore import __main__ as entry

    given, extras = [], []

    class RecordingWorker:
        def __init__(self, scorer, cfg, *args, extra_scorers=(), **kwargs):
            given.append((scorer, cfg))
            extras.extend(extra_scorers)

        def run(self, stop):
            given[0][0].ready.wait(WAIT_S)
            raise RuntimeError("injected: the stream worker ends here, which ends `serve` with exit 1")

    monkeypatch.setattr(entry, "StreamWorker", RecordingWorker)
    cfg = _cfg(tiny_model, extra_model_dirs=(str(model_b),), port=0, grace_s=2)
    caplog.set_level(logging.INFO)
    assert asyncio.run(asyncio.wait_for(entry._serve(cfg, with_worker=True), 120)) == 1
    ((scorer, worker_cfg),) = given
    assert scorer.cfg is cfg and worker_cfg is cfg  # the primary's, not B's
    assert [e.cfg.model_dir for e in extras] == [str(model_b)]
    assert any("stream worker stopped unexpectedly" in r.getMessage() for r in caplog.records)


def test_the_watchdog_sees_every_engine():
    from services.refscore.__main__ import _AllEngines
    from services.refscore.watchdog import Watchdog

    class Engine:
        def __init__(self, alive=True, busy=0.0):
            self.stopping, self.alive, self.busy = False, alive, busy

        def engine_alive(self):
            return self.alive

        def engine_busy_s(self, now=None):
            return self.busy

    assert Watchdog(_AllEngines([Engine(), Engine()]), stall_s=10).problem() is None
    dead = Watchdog(_AllEngines([Engine(), Engine(alive=False)]), stall_s=10).problem()
    assert dead is not None and not dead.stalled
    stuck = Watchdog(_AllEngines([Engine(), Engine(busy=11.0)]), stall_s=10).problem()
    assert stuck is not None and stuck.stalled
