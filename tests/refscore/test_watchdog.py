"""The engine thread's robustness and the watchdog, on a fake engine (no vLLM, no Kafka):

- a cancel that lands while the engine thread claims a job never raises in that thread;
- a thread that dies fails what it held and what was queued, and refuses new work;
- a caller's wait on the engine is bounded;
- the watchdog reports a dead or stuck engine or worker thread, and nothing while stopping.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import types

import pytest

from services.refscore import scorer as scorer_mod
from services.refscore.config import RefscoreConfig
from services.refscore.errors import DeadlineExceeded, NotReady
from services.refscore.scorer import Prepared, ScoreJob, Scorer
from services.refscore.watchdog import Heartbeat, Watchdog

from .test_worker_batching import FakeEngine

WAIT_S = 10


class BlockingEngine(FakeEngine):
    """Blocks inside `score` until `release` is set (a hung engine, for as long as the test wants)."""

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def score(self, seqs):
        self.entered.set()
        self.release.wait(WAIT_S)
        return super().score(seqs)


@pytest.fixture
def make_scorer(tiny_model):
    made: list[Scorer] = []

    def make(engine=None, **cfg) -> Scorer:
        scorer = Scorer(RefscoreConfig(model_dir=str(tiny_model), **cfg))
        scorer.load(engine or FakeEngine())
        made.append(scorer)
        return scorer

    yield make
    for scorer in made:
        if isinstance(scorer.engine, BlockingEngine):
            scorer.engine.release.set()
        scorer.shutdown()


def _item(n: int = 3) -> Prepared:
    return Prepared(list(range(1, n + 1)), [7, 8])


class CancelledWhileClaimed(concurrent.futures.Future):
    """A future whose caller cancels it at the very moment the engine thread claims it."""

    def set_running_or_notify_cancel(self) -> bool:
        self.cancel()
        return super().set_running_or_notify_cancel()


def test_a_cancel_landing_while_a_job_is_claimed_never_raises_in_the_engine_thread(make_scorer):
    scorer = make_scorer()
    expired = time.monotonic() - 1  # past its deadline: the path that sets DeadlineExceeded
    job = ScoreJob(sequences=[([1, 2], [3])], tokens=3, deadline=expired, future=CancelledWhileClaimed())
    assert scorer._claim(job) is False
    assert job.future.cancelled()
    # Through the real thread too: it survives and goes on serving.
    scorer._queue.put(ScoreJob(sequences=[([1, 2], [3])], tokens=3, deadline=expired, future=CancelledWhileClaimed()))
    assert scorer.score([_item()], timeout=WAIT_S)
    assert scorer.engine_alive()


def test_cancels_racing_expired_jobs_leave_the_engine_thread_alive(make_scorer):
    """Many queued jobs past their deadline, cancelled concurrently from another thread: every
    future ends cancelled or with DeadlineExceeded, and the engine thread keeps serving."""
    engine = BlockingEngine()
    scorer = make_scorer(engine)
    plug = scorer.submit_score([_item()])  # holds the engine thread while the queue fills
    assert engine.entered.wait(WAIT_S)
    jobs = [scorer.submit_score([_item()], deadline=time.monotonic() + 0.001) for _ in range(300)]
    time.sleep(0.01)  # all past their deadline
    canceller = threading.Thread(target=lambda: [f.cancel() for f in jobs[::2]])
    canceller.start()
    engine.release.set()
    canceller.join(WAIT_S)
    plug.result(WAIT_S)
    for f in jobs:
        try:
            f.result(WAIT_S)
        except (concurrent.futures.CancelledError, DeadlineExceeded):
            pass
    assert scorer.engine_alive()
    assert scorer.score([_item()], timeout=WAIT_S)


def test_a_job_past_its_deadline_is_failed_not_computed(make_scorer):
    engine = FakeEngine()
    scorer = make_scorer(engine)
    future = scorer.submit_score([_item()], deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        future.result(WAIT_S)
    assert engine.calls == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_engine_thread_that_dies_fails_its_jobs_and_refuses_new_ones(make_scorer):
    engine = BlockingEngine()
    scorer = make_scorer(engine, failpoint="engine_thread_dies")
    first = scorer.submit_score([_item()])  # the thread dies on taking it
    with pytest.raises(NotReady):
        first.result(WAIT_S)
    scorer._thread.join(WAIT_S)
    assert not scorer.engine_alive()
    with pytest.raises(NotReady, match="engine thread has stopped"):
        scorer.submit_score([_item()])
    with pytest.raises(NotReady):
        scorer.model()


def test_jobs_queued_when_the_engine_thread_dies_are_failed(make_scorer):
    scorer = make_scorer()
    queued = ScoreJob(sequences=[([1], [2])], tokens=2, deadline=None)
    scorer._queue._fifos["someone"] = collections.deque([queued])  # queued, not yet taken
    for job in scorer._queue.close(NotReady("the engine thread has stopped")):
        scorer_mod._fail(job, NotReady("the engine thread has stopped"))
    with pytest.raises(NotReady):
        queued.future.result(0)
    with pytest.raises(NotReady):
        scorer._queue.put(ScoreJob(sequences=[([1], [2])], tokens=2, deadline=None))


def test_an_exception_while_serving_a_batch_fails_that_batch_and_the_thread_goes_on(make_scorer, monkeypatch):
    scorer = make_scorer()
    real = scorer._run_score_batch
    calls = []

    def flaky(engine, batch):
        calls.append(1)
        if len(calls) == 1:
            raise IndexError("injected: a fault outside the engine call")
        return real(engine, batch)

    monkeypatch.setattr(scorer, "_run_score_batch", flaky)
    with pytest.raises(IndexError):
        scorer.score([_item()], timeout=WAIT_S)
    assert scorer.score([_item()], timeout=WAIT_S)
    assert scorer.engine_alive()


def test_a_wait_on_the_engine_is_bounded_and_beats_while_waiting(make_scorer):
    engine = BlockingEngine()
    scorer = make_scorer(engine)
    beats = []
    started = time.monotonic()
    with pytest.raises(NotReady, match="did not answer within"):
        scorer.score([_item()], timeout=2.5, heartbeat=lambda: beats.append(1))
    assert 2.4 < time.monotonic() - started < 6
    assert len(beats) >= 2, "the waiting caller beat about once a second"
    assert scorer.engine_busy_s() > 2, "the engine is still inside the call"


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeScorer:
    def __init__(self, clock: FakeClock):
        self.clock = clock
        self.alive = True
        self.busy_since: float | None = None
        self.stopping = False

    def engine_alive(self) -> bool:
        return self.alive

    def engine_busy_s(self, now=None) -> float:
        return 0.0 if self.busy_since is None else (now or self.clock()) - self.busy_since


def test_the_watchdog_reports_a_dead_or_stuck_engine():
    clock = FakeClock()
    scorer = FakeScorer(clock)
    dog = Watchdog(scorer, stall_s=60, clock=clock)
    assert dog.problem() is None
    scorer.busy_since = clock.now
    clock.now += 59
    assert dog.problem() is None, "a long engine call within the limit is fine"
    clock.now += 2
    problem = dog.problem()
    assert problem is not None and problem.stalled and "inside one call for 61 s" in str(problem)
    scorer.busy_since = None
    assert dog.problem() is None
    scorer.alive = False
    problem = dog.problem()
    assert problem is not None and not problem.stalled and "engine thread died" in str(problem)
    dog.stopping()
    assert dog.problem() is None, "threads ending during an orderly stop are no failure"


def test_the_watchdog_reports_a_dead_or_quiet_worker():
    clock = FakeClock()
    scorer = FakeScorer(clock)
    beat = Heartbeat(clock)
    done = threading.Event()
    thread = threading.Thread(target=done.wait, daemon=True)
    thread.start()
    dog = Watchdog(scorer, stall_s=60, worker_thread=thread, worker_beat=beat, clock=clock)
    clock.now += 50
    assert dog.problem() is None
    beat.beat()
    clock.now += 50
    assert dog.problem() is None, "a beat resets the window"
    clock.now += 11
    problem = dog.problem()
    assert problem is not None and problem.stalled and "not come round its loop for 61 s" in str(problem)
    beat.beat()
    done.set()
    thread.join(WAIT_S)
    problem = dog.problem()
    assert problem is not None and not problem.stalled and "stream worker stopped unexpectedly" in str(problem)
    scorer.stopping = True
    assert dog.problem() is None


def test_the_watchdog_sees_the_real_scorer_hang_and_die(make_scorer):
    engine = BlockingEngine()
    scorer = make_scorer(engine)
    dog = Watchdog(scorer, stall_s=0.5)
    future = scorer.submit_score([_item()])
    assert engine.entered.wait(WAIT_S)
    time.sleep(0.7)
    problem = dog.problem()
    assert problem is not None and problem.stalled, problem
    engine.release.set()
    future.result(WAIT_S)
    assert dog.problem() is None


def test_a_worker_whose_engine_fails_every_batch_past_stall_s_is_a_problem():
    now = [0.0]
    beat = Heartbeat(clock=lambda: now[0])
    scorer = types.SimpleNamespace(stopping=False, engine_alive=lambda: True, engine_busy_s=lambda now=None: 0.0)
    dog = Watchdog(scorer, stall_s=60, worker_beat=beat, clock=lambda: now[0])
    beat.failing("RuntimeError: CUDA error: an illegal memory access")
    for t in (30.0, 60.0):
        now[0] = t
        beat.beat()  # the loop keeps coming round while it retries: not stuck, but not working
        assert dog.problem() is None
    now[0] = 61.0
    beat.beat()
    problem = dog.problem()
    assert problem is not None and not problem.stalled and "illegal memory access" in str(problem)
    beat.working()
    assert dog.problem() is None
