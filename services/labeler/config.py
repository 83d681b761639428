"""Labeler settings: every one an environment variable with a default and one line of help, and a key of
the `--config` file (CONFIG_FILE)."""

from __future__ import annotations

import dataclasses

from offdpo.config import ConfigFile, EnvConfig, KafkaConfig, env
from offdpo.errors import ConfigError
from services.labeler.names import (
    CANDIDATE_STRATEGIES,
    JUDGE_MODES,
    PAIR_MODES,
    JudgeMode,
    PairMode,
    StrategyName,
    candidate_strategy_problem,
    one_of,
    problem,
)
from services.labeler.server_config import LabelerServerConfig, RulesConfig


@dataclasses.dataclass(frozen=True, repr=False)
class LabelerConfig(EnvConfig):
    strategy: str = env(
        "OFFDPO_LABELER_STRATEGY",
        StrategyName.RULES.value,
        f"default strategy for candidate sets that name none: {one_of(CANDIDATE_STRATEGIES)}",
    )
    group_id: str = env("OFFDPO_LABELER_GROUP", "offdpo-labeler", "consumer group for the candidates topic")
    state_dir: str = env(
        "OFFDPO_LABELER_STATE_DIR", ".cache/labeler", "verdict cache and published-ids ledger (SQLite files)"
    )
    ledger: bool = env(
        "OFFDPO_LABELER_LEDGER", True, "remember published pair ids per topic so a rerun does not send them again"
    )
    rules_file: str = env("OFFDPO_LABELER_RULES", "", "YAML rules file for the rules strategy")
    reference: str = env(
        "OFFDPO_LABELER_REFERENCE",
        "",
        "fingerprint id of the reference refscore scores these pairs with (a worker serving several; "
        "empty: its primary model); a pair that names its own keeps it",
    )
    pair_mode: str = env(
        "OFFDPO_LABELER_PAIR_MODE",
        PairMode.BEST_WORST.value,
        "best_worst: one pair per set; all: every pair whose score gap exceeds the margin",
    )
    margin: float = env("OFFDPO_LABELER_MARGIN", 0.0, "minimum score gap for a pair (rules, reward model, judge)")
    reward_model: str = env("OFFDPO_LABELER_REWARD_MODEL", "", "directory of a sequence-classification reward model")
    reward_batch_size: int = env("OFFDPO_LABELER_REWARD_BATCH", 16, "answers scored per reward-model forward pass")
    reward_max_length: int = env(
        "OFFDPO_LABELER_REWARD_MAX_LEN", 2048, "truncate reward-model inputs to this many tokens"
    )
    batch_size: int = env("OFFDPO_LABELER_BATCH", 64, "candidate sets labelled per batch (then pairs are flushed)")
    max_input_bytes: int = env(
        "OFFDPO_LABELER_MAX_INPUT_BYTES", 4 * 1024 * 1024, "largest candidate set (JSON line or Kafka record) accepted"
    )
    max_answers: int = env("OFFDPO_LABELER_MAX_ANSWERS", 16, "most answers per candidate set")
    refscore_address: str = env(
        "OFFDPO_LABELER_REFSCORE_ADDR", "127.0.0.1:50051", "refscore gRPC address for on-policy generation"
    )
    generate_n: int = env("OFFDPO_LABELER_GENERATE_N", 0, "on-policy samples to add per prompt (0 = off)")
    generate_max_tokens: int = env("OFFDPO_LABELER_GENERATE_MAX_TOKENS", 256, "max tokens per on-policy sample")
    generate_temperature: float = env("OFFDPO_LABELER_GENERATE_TEMPERATURE", 1.0, "sampling temperature")
    generate_timeout_s: float = env("OFFDPO_LABELER_GENERATE_TIMEOUT_S", 120.0, "deadline of one Generate call")
    refscore_token: str = env("OFFDPO_LABELER_REFSCORE_TOKEN", "", "this team's refscore bearer token", secret=True)
    refscore_ca: str = env(
        "OFFDPO_LABELER_REFSCORE_CA",
        "",
        "CA bundle to verify refscore's TLS certificate (empty: plaintext, local development only)",
    )
    refscore_cert: str = env("OFFDPO_LABELER_REFSCORE_CERT", "", "client certificate for refscore's mTLS")
    refscore_key: str = env("OFFDPO_LABELER_REFSCORE_KEY", "", "client key for refscore's mTLS")
    grpc_port: int = env("OFFDPO_LABELER_GRPC_PORT", 50061, "port of the labeler's gRPC server")
    grpc_host: str = env("OFFDPO_LABELER_GRPC_HOST", "0.0.0.0", "bind address of the gRPC server")
    health_port: int = env(
        "OFFDPO_LABELER_HEALTH_PORT",
        0,
        "consume: plaintext grpc.health.v1 port for kubelet's liveness probe (0 = none)",
    )
    stall_s: float = env(
        "OFFDPO_LABELER_STALL_S",
        300.0,
        "consume: health turns NOT_SERVING when the poll loop has not come round for this long",
    )
    outage_ready_s: float = env(
        "OFFDPO_LABELER_OUTAGE_READY_S",
        120.0,
        "consume: health service 'readiness' turns NOT_SERVING after this long of continuous retrying of a"
        " dependency outage (judge, reward model, refscore, Kafka), SERVING again when it resumes (0: never);"
        " liveness ('') stays about a stuck loop",
    )
    grpc_max_message_bytes: int = env(
        "OFFDPO_LABELER_GRPC_MAX_MESSAGE_BYTES", 16 * 1024 * 1024, "largest gRPC request or response"
    )
    grpc_max_sets: int = env("OFFDPO_LABELER_GRPC_MAX_SETS", 256, "most candidate sets per SubmitCandidates call")
    ack_timeout_s: float = env("OFFDPO_LABELER_ACK_TIMEOUT_S", 60.0, "wait this long for Kafka to acknowledge pairs")

    def __post_init__(self) -> None:
        # Refused at start: a wrong default would otherwise reject every set that names no strategy.
        wrong = candidate_strategy_problem(self.strategy)
        if wrong:
            raise ConfigError(f"OFFDPO_LABELER_STRATEGY: {wrong}")
        wrong = problem(self.pair_mode, PAIR_MODES, "OFFDPO_LABELER_PAIR_MODE")
        if wrong:
            raise ConfigError(wrong)


@dataclasses.dataclass(frozen=True, repr=False)
class JudgeConfig(EnvConfig):
    base_url: str = env("OFFDPO_JUDGE_BASE_URL", "http://127.0.0.1:8000/v1", "OpenAI-compatible API root of the judge")
    model: str = env("OFFDPO_JUDGE_MODEL", "", "judge model name as the endpoint knows it")
    api_key: str = env("OFFDPO_JUDGE_API_KEY", "unused", "API key of the judge endpoint", secret=True)
    mode: str = env(
        "OFFDPO_JUDGE_MODE",
        JudgeMode.GSB.value,
        f"{one_of(JUDGE_MODES)}; gsb: compare two answers both ways, reference: score each vs the reference",
    )
    gsb_template: str = env("OFFDPO_JUDGE_GSB_TEMPLATE", "", "file replacing the GSB prompt template")
    reference_template: str = env("OFFDPO_JUDGE_REFERENCE_TEMPLATE", "", "file replacing the reference-mode template")
    scale_min: int = env("OFFDPO_JUDGE_SCALE_MIN", 1, "lowest score in reference mode")
    scale_max: int = env("OFFDPO_JUDGE_SCALE_MAX", 10, "highest score in reference mode")
    structured_output: bool = env(
        "OFFDPO_JUDGE_STRUCTURED",
        True,
        "constrain the verdict with vLLM structured outputs (choice); off for other APIs",
    )
    max_tokens: int = env("OFFDPO_JUDGE_MAX_TOKENS", 8, "max tokens of one verdict")
    temperature: float = env("OFFDPO_JUDGE_TEMPERATURE", 0.0, "judge sampling temperature")
    timeout_s: float = env("OFFDPO_JUDGE_TIMEOUT_S", 60.0, "timeout of one judge request")
    max_retries: int = env("OFFDPO_JUDGE_MAX_RETRIES", 4, "retries of a failed judge request (timeouts, 429, 5xx)")
    backoff_s: float = env("OFFDPO_JUDGE_BACKOFF_S", 1.0, "first retry delay; doubles each retry, with jitter")
    backoff_max_s: float = env("OFFDPO_JUDGE_BACKOFF_MAX_S", 30.0, "longest retry delay")
    concurrency: int = env("OFFDPO_JUDGE_CONCURRENCY", 4, "judge requests in flight at once")
    cache: bool = env("OFFDPO_JUDGE_CACHE", True, "cache verdicts in the state dir so a rerun does not pay twice")


CONFIG_CLASSES = (KafkaConfig, LabelerConfig, JudgeConfig, LabelerServerConfig, RulesConfig)


@dataclasses.dataclass(frozen=True, repr=False)
class AnnotateConfig(EnvConfig):
    """The annotation web app (`python -m services.labeler annotate`). Not in CONFIG_CLASSES yet: the
    deploy manifests do not run the app, and the env-contract test checks every listed variable there."""

    host: str = env("OFFDPO_ANNOTATE_HOST", "0.0.0.0", "bind address of the annotation app")
    port: int = env("OFFDPO_ANNOTATE_PORT", 8088, "port of the annotation app (HTTP)")
    tokens_file: str = env(
        "OFFDPO_ANNOTATE_TOKENS",
        "",
        "file of `annotator_id:sha256(token)` lines (mounted from a Secret); required",
    )
    insecure_cookies: bool = env(
        "OFFDPO_ANNOTATE_INSECURE_COOKIES",
        False,
        "local development only: session cookies without `Secure`, so plain http://localhost works",
    )
    group_id: str = env("OFFDPO_ANNOTATE_GROUP", "offdpo-annotate", "consumer group reading the candidates topic")
    overlap: int = env("OFFDPO_ANNOTATE_OVERLAP", 2, "annotators who judge each item (never the same one twice)")
    lease_s: float = env(
        "OFFDPO_ANNOTATE_LEASE_S", 900.0, "a claimed item returns to the queue after this long without a judgement"
    )
    undo_s: float = env(
        "OFFDPO_ANNOTATE_UNDO_S", 10.0, "grace period in which a judgement can be undone; it is final after it"
    )
    rationale_max_chars: int = env("OFFDPO_ANNOTATE_RATIONALE_MAX", 1000, "longest rationale accepted (characters)")
    guidelines_file: str = env(
        "OFFDPO_ANNOTATE_GUIDELINES", "", "guidelines shown to annotators (empty: the shipped ones)"
    )
    guidelines_version: str = env(
        "OFFDPO_ANNOTATE_GUIDELINES_VERSION",
        "",
        "version recorded with every judgement (empty: the first 12 hex of the guidelines' sha256)",
    )
    session_s: float = env("OFFDPO_ANNOTATE_SESSION_S", 12 * 3600.0, "sign-in lifetime")
    stats_batch: int = env("OFFDPO_ANNOTATE_STATS_BATCH", 50, "items per batch in the agreement statistics")
    publish_interval_s: float = env(
        "OFFDPO_ANNOTATE_PUBLISH_INTERVAL_S", 1.0, "how often items whose judgements are final are published"
    )

    def __post_init__(self) -> None:
        if self.overlap < 1:
            raise ConfigError("OFFDPO_ANNOTATE_OVERLAP must be at least 1")
        if self.lease_s <= 0 or self.undo_s < 0:
            raise ConfigError("OFFDPO_ANNOTATE_LEASE_S must be positive and OFFDPO_ANNOTATE_UNDO_S not negative")


# `--config FILE` of every subcommand (issue 32): the labeler's own settings at the top level, as the
# trainer's file. RulesConfig (which packages a rules file's `callable:` may import) is not in it: it is a
# security allow-list the rules loader reads from the pod's environment only (services/labeler/rules.py).
CONFIG_FILE = ConfigFile(
    service="labeler",
    top=LabelerConfig,
    sections={"kafka": KafkaConfig, "judge": JudgeConfig, "server": LabelerServerConfig, "annotate": AnnotateConfig},
    listing="`python -m services.labeler serve --print-config` (or `offdpo labeler serve --print-config`)",
)
