"""Prometheus metrics of refscore (served on OFFDPO_REFSCORE_METRICS_PORT).

Engine and stream-worker series carry `model`: the fingerprint id of the reference that did the work
(a server may serve several, OFFDPO_REFSCORE_EXTRA_MODEL_DIRS; ModelInfo maps ids to model ids)."""

from prometheus_client import Counter, Gauge, Histogram

ENGINE_TOKENS = Counter("refscore_engine_tokens_total", "prompt+answer tokens run through the engine", ["model"])
ENGINE_SHARED_TOKENS = Counter(
    "refscore_engine_shared_prompt_tokens_total",
    "prompt tokens of a pair's second answer read from the prefix cache instead of recomputed (vLLM, share_prompts)",
    ["model"],
)
ENGINE_SECONDS = Counter("refscore_engine_seconds_total", "seconds spent in engine calls", ["model"])
ENGINE_BATCH_SEQS = Histogram(
    "refscore_engine_batch_sequences",
    "sequences per engine call",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
RPC_ERRORS = Counter("refscore_rpc_errors_total", "RPCs that ended with an error", ["method", "code"])
RPC_ITEMS = Counter("refscore_rpc_items_total", "items scored over gRPC", ["method"])
WORKER_PAIRS = Counter("refscore_worker_pairs_total", "pairs scored by the stream worker", ["model"])
WORKER_DEADLETTERS = Counter(
    "refscore_worker_deadletters_total", "records the stream worker dead-lettered", ["error_type"]
)
WORKER_SHARDS = Counter("refscore_worker_shards_total", "shards written by the stream worker", ["model"])
WORKER_BATCH_PAIRS = Histogram(
    "refscore_worker_batch_pairs", "pairs per micro-batch", buckets=(1, 4, 16, 64, 128, 256, 512, 1024)
)
WORKER_LAG = Gauge("refscore_worker_lag_records", "records behind the end of the pairs topic", ["partition"])
# Per caller (team name from the auth file; "anonymous" without one; "-" before authentication;
# "stream-worker" for the Kafka stream worker's jobs).
CALLER_REQUESTS = Counter("refscore_caller_requests_total", "RPCs received, by caller and method", ["caller", "method"])
CALLER_ERRORS = Counter(
    "refscore_caller_errors_total",
    "RPCs refused or failed, by caller and status code (UNAUTHENTICATED, RESOURCE_EXHAUSTED, ...)",
    ["caller", "code"],
)
CALLER_TOKENS = Counter(
    "refscore_caller_tokens_total", "prompt+answer tokens queued for the engine, by caller", ["caller"]
)
CALLER_IN_FLIGHT = Gauge("refscore_caller_in_flight", "RPCs in flight, by caller", ["caller"])
CALLER_QUEUED = Gauge("refscore_caller_queued_jobs", "jobs waiting for the engine, by caller", ["caller"])
