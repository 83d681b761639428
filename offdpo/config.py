"""Configuration from environment variables, with documented defaults.

Every setting is a dataclass field declared with `env(...)`: the variable's name, its default and
one line of help live together, so `offdpo config` can print them, the deploy manifests can be
checked against them, and a service never reads an undeclared variable.

The defaults are the local stack's (loopback, dev credentials); production sets every variable
from the Kubernetes manifests and Secrets in deploy/.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from offdpo import errors

# Marked dev placeholders: the only credentials that may appear in the repository.
DEV_ACCESS_KEY = "offdpo-dev-access-key"
DEV_SECRET_KEY = "offdpo-dev-secret-key-not-for-production"


def env(name: str, default: Any, help: str, *, secret: bool = False) -> Any:
    """Declare a setting read from environment variable `name`."""
    return dataclasses.field(default=default, metadata={"env": name, "help": help, "secret": secret})


ConfigError = errors.ConfigError  # re-exported: settings are where it is raised


def _parse(raw: str, default: Any, name: str) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    return raw


class EnvConfig:
    """Mixin for frozen dataclasses whose fields are declared with `env(...)`."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any):
        return cls.from_sources(None, environ, **overrides)

    @classmethod
    def from_sources(
        cls, file_values: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None, **overrides: Any
    ):
        """Defaults < `file_values` (a config file's, see load_config_file) < environment < `overrides`
        (command-line flags): a file sets a run up, a pod's manifest still overrides it."""
        environ = os.environ if environ is None else environ
        values = dict(file_values or {})
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            name = f.metadata["env"]
            if name in environ:
                values[f.name] = _parse(environ[name], f.default, name)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def env_vars(cls) -> dict[str, dict[str, Any]]:
        return {
            f.metadata["env"]: {"default": f.default, "help": f.metadata["help"], "secret": f.metadata["secret"]}
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        }

    def __repr__(self) -> str:  # never print secrets
        parts = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = "***" if f.metadata["secret"] else repr(getattr(self, f.name))
            parts.append(f"{f.name}={value}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclasses.dataclass(frozen=True, repr=False)
class S3Config(EnvConfig):
    endpoint: str = env("OFFDPO_S3_ENDPOINT", "127.0.0.1:8333", "host:port of the S3 API (MinIO in production)")
    access_key: str = env("OFFDPO_S3_ACCESS_KEY", DEV_ACCESS_KEY, "S3 access key", secret=True)
    secret_key: str = env("OFFDPO_S3_SECRET_KEY", DEV_SECRET_KEY, "S3 secret key", secret=True)
    secure: bool = env("OFFDPO_S3_SECURE", False, "use HTTPS to reach S3")
    ca_file: str = env(
        "OFFDPO_S3_CA_FILE", "", "CA bundle (PEM) that signed the S3 server's certificate; empty: the system CAs"
    )
    region: str = env("OFFDPO_S3_REGION", "us-east-1", "S3 region")
    bucket: str = env("OFFDPO_S3_BUCKET", "offdpo", "bucket for scored shards and checkpoints")
    retry_max_s: float = env("OFFDPO_S3_RETRY_MAX_S", 300.0, "give up an S3 operation after retrying this long")


BROKER_PROFILES = ("kafka", "tansu")  # offdpo.broker_profile.BrokerProfile


@dataclasses.dataclass(frozen=True, repr=False)
class KafkaConfig(EnvConfig):
    bootstrap_servers: str = env("OFFDPO_KAFKA_BOOTSTRAP", "127.0.0.1:9092", "comma-separated Kafka bootstrap servers")
    security_protocol: str = env(
        "OFFDPO_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL"
    )
    sasl_mechanism: str = env("OFFDPO_KAFKA_SASL_MECHANISM", "", "e.g. SCRAM-SHA-512 when SASL is used")
    sasl_username: str = env("OFFDPO_KAFKA_SASL_USERNAME", "", "SASL user", secret=True)
    sasl_password: str = env("OFFDPO_KAFKA_SASL_PASSWORD", "", "SASL password", secret=True)
    ssl_cafile: str = env("OFFDPO_KAFKA_SSL_CAFILE", "", "CA bundle for SSL/SASL_SSL")
    ssl_certfile: str = env("OFFDPO_KAFKA_SSL_CERTFILE", "", "client certificate (PEM) for brokers that require mTLS")
    ssl_keyfile: str = env("OFFDPO_KAFKA_SSL_KEYFILE", "", "private key (PEM) of the client certificate")
    ssl_password: str = env("OFFDPO_KAFKA_SSL_PASSWORD", "", "password of an encrypted client key", secret=True)
    pairs_topic: str = env("OFFDPO_TOPIC_PAIRS", "offdpo.pairs.v1", "preference pairs (labeler -> refscore)")
    shards_topic: str = env("OFFDPO_TOPIC_SHARDS", "offdpo.shards.v1", "shard-ready events (refscore -> trainer)")
    candidates_topic: str = env("OFFDPO_TOPIC_CANDIDATES", "offdpo.candidates.v1", "candidate sets (-> labeler)")
    deadletter_topic: str = env(
        "OFFDPO_TOPIC_DEADLETTER", "offdpo.deadletter.v1", "records that could not be processed"
    )
    # Group membership timeouts: the Kafka defaults make the first join take ~20 s on Tansu;
    # tests set small values, production keeps these.
    session_timeout_ms: int = env("OFFDPO_KAFKA_SESSION_TIMEOUT_MS", 30000, "consumer group session timeout")
    heartbeat_interval_ms: int = env("OFFDPO_KAFKA_HEARTBEAT_MS", 3000, "consumer group heartbeat interval")
    max_poll_interval_ms: int = env(
        "OFFDPO_KAFKA_MAX_POLL_INTERVAL_MS", 600000, "max time between polls before a consumer is evicted"
    )
    request_timeout_ms: int = env("OFFDPO_KAFKA_REQUEST_TIMEOUT_MS", 30000, "client request timeout")
    # A group member subscribes by topic name; the assignment covers only the partitions in its metadata.
    # A member that joined while the broker could not describe a topic (the broker's storage was down,
    # the topic not created yet) holds no partition of it until its next metadata refresh triggers a
    # rejoin, and kafka-python's default refresh is every 5 minutes: a partition stalled that long.
    metadata_max_age_ms: int = env(
        "OFFDPO_KAFKA_METADATA_MAX_AGE_MS",
        30000,
        "refresh topic metadata at least this often (new partitions, topics back after an outage)",
    )
    # What the local broker does differently from Apache Kafka is handled in one place,
    # offdpo.broker_profile, and only when this says so; production runs the plain `kafka` profile.
    broker_profile: str = env(
        "OFFDPO_KAFKA_BROKER_PROFILE",
        "kafka",
        "kafka (Apache Kafka, Strimzi, MSK, Confluent) or tansu (the local stack's broker: see offdpo.broker_profile)",
    )
    offset_hole_wait_ms: int = env(
        "OFFDPO_KAFKA_OFFSET_HOLE_WAIT_MS",
        15000,
        "tansu profile only: hold records that arrive after a hole in a partition's offsets this long for "
        "the hole to fill (0: off)",
    )

    def __post_init__(self) -> None:
        if self.broker_profile not in BROKER_PROFILES:
            raise ConfigError(
                f"OFFDPO_KAFKA_BROKER_PROFILE={self.broker_profile!r}: expected one of {', '.join(BROKER_PROFILES)}"
            )

    def client_kwargs(self) -> dict[str, Any]:
        """Connection settings shared by kafka-python producers, consumers and admin clients."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "request_timeout_ms": self.request_timeout_ms,
            "metadata_max_age_ms": self.metadata_max_age_ms,
        }
        if self.security_protocol.startswith("SASL_") and not (
            self.sasl_mechanism and self.sasl_username and self.sasl_password
        ):
            raise ConfigError(
                f"OFFDPO_KAFKA_SECURITY_PROTOCOL={self.security_protocol} needs OFFDPO_KAFKA_SASL_MECHANISM, "
                "OFFDPO_KAFKA_SASL_USERNAME and OFFDPO_KAFKA_SASL_PASSWORD"
            )
        if self.sasl_mechanism:
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism,
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        if self.ssl_cafile:
            kwargs["ssl_cafile"] = self.ssl_cafile
        if self.ssl_certfile:
            kwargs.update(
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile or None,
                ssl_password=self.ssl_password or None,
            )
        return kwargs

    def all_topics(self) -> tuple[str, ...]:
        return (self.candidates_topic, self.pairs_topic, self.shards_topic, self.deadletter_topic)


def describe(*config_classes: type[EnvConfig]) -> str:
    """Human-readable table of variables, for `offdpo config` and the README."""
    lines = []
    for cls in config_classes:
        lines.append(f"[{cls.__name__}]")
        for name, spec in cls.env_vars().items():
            default = "(secret)" if spec["secret"] and spec["default"] else repr(spec["default"])
            lines.append(f"  {name} = {default}  # {spec['help']}")
    return "\n".join(lines)


# -- configuration files (issue 32) -----------------------------------------------------------------
# A YAML file holds the same settings as the environment, by field name: one class's fields at the top
# level (flat, as TRL or axolotl configs are) and other classes' in named sections (`kafka:`, `s3:`).
# Precedence, lowest first: the field's default, the file, the environment variable, a command-line flag
# (the pods' manifests keep overriding what a file says). Values are checked against the type of the
# field's default, strictly: `pack: "yes"` is a string, not a bool, and says so.

_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list of strings"}


def _file_value(value: Any, default: Any, where: str) -> Any:
    """`value` as read from YAML, checked against the type of `default`; ConfigError (one line) if wrong."""
    kind = type(default)
    ok = False
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is tuple:
        if isinstance(value, str):  # "a,b" as in the environment variable
            value, ok = tuple(part.strip() for part in value.split(",") if part.strip()), True
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            value, ok = tuple(value), True
    elif kind is str:
        ok = isinstance(value, str)
    else:  # a field type this loader does not know: take the value as given
        ok = True
    if not ok:
        got = "nothing" if value is None else repr(value)
        hint = " (quote it)" if kind is str and isinstance(value, int | float | bool) else ""
        raise ConfigError(f"{where}: expected {_EXPECTED.get(kind, kind.__name__)}, got {got}{hint}")
    return value


def _section_values(
    raw: Mapping[str, Any], cls: type[EnvConfig], where: str, prefix: str, listing: str
) -> dict[str, Any]:
    import difflib

    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            maybe = f" (did you mean {prefix}{close[0]!r}?)" if close else ""
            here = f"under `{prefix[:-1]}:`" if prefix else "at the top level"
            raise ConfigError(
                f"{where}: unknown setting {prefix}{key!r}{maybe}; valid {here}: {', '.join(fields)}; "
                f"every setting with its help: {listing}"
            )
        values[key] = _file_value(value, fields[key].default, f"{where}: {prefix}{key}")
    return values


def load_config_file(
    path: str | os.PathLike[str],
    top: type[EnvConfig],
    sections: Mapping[str, type[EnvConfig]],
    listing: str,
) -> dict[type[EnvConfig], dict[str, Any]]:
    """Read a YAML configuration file: `top`'s fields at the top level, each class of `sections` under its
    key. Returns the values given, by class (pass them to `EnvConfig.from_sources`). Every problem is a
    ConfigError of one line that names the file and the setting; `listing` says where the valid names are."""
    import yaml

    where = str(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the configuration file: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML: {problem}{at}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected `setting: value` lines at the top level, got {type(raw).__name__}")
    out: dict[type[EnvConfig], dict[str, Any]] = {cls: {} for cls in (top, *sections.values())}
    top_raw = {k: v for k, v in raw.items() if k not in sections}
    out[top] = _section_values(top_raw, top, where, "", listing)
    for name, cls in sections.items():
        section = raw.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"{where}: {name}: expected a section of `setting: value` lines, got {section!r}")
        out[cls] = _section_values(section, cls, where, f"{name}.", listing)
    return out


def _yaml_scalar(value: Any) -> str:
    import yaml

    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def config_yaml_lines(cfg: EnvConfig, indent: str = "") -> list[str]:
    """`cfg` as YAML lines `name: value  # help`; a secret is never written (a comment names its variable)."""
    lines = []
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        if f.metadata.get("secret"):
            lines.append(f"{indent}# {f.name}: (secret, not written: set {f.metadata['env']})")
            continue
        lines.append(f"{indent}{f.name}: {_yaml_scalar(getattr(cfg, f.name))}  # {f.metadata['help']}")
    return lines


def resolved_config_yaml(
    trainer_cfg: EnvConfig, kafka_cfg: KafkaConfig, s3_cfg: S3Config, **sections: EnvConfig
) -> str:
    """The resolved configuration of a trainer run as a YAML file that `--config` reloads: the trainer's
    settings at the top level, then `kafka:`, `s3:` and any other `sections` (e.g. trackers=...). Secrets
    are left out (a rerun takes them from its environment, as the pods do), so the file can be stored
    next to the checkpoints and printed."""
    return settings_yaml("trainer", trainer_cfg, {"kafka": kafka_cfg, "s3": s3_cfg, **sections})


def settings_yaml(service: str, top: EnvConfig, sections: Mapping[str, EnvConfig]) -> str:
    """A service's resolved configuration as a YAML file its `--config` reloads: `top`'s settings at the
    top level, each of `sections` under its name; secrets left out (named in comments)."""
    lines = [f"# offdpo {service} configuration (reload with --config; secrets come from the environment)"]
    lines += config_yaml_lines(top)
    for name, cfg in sections.items():
        lines += ["", f"{name}:"]
        lines += config_yaml_lines(cfg, "  ")
    return "\n".join(lines) + "\n"


def config_params(trainer_cfg: EnvConfig, **sections: EnvConfig) -> dict[str, Any]:
    """Flat `name` / `section.name` -> value of the non-secret settings, for experiment trackers' params."""
    out: dict[str, Any] = {}
    for prefix, cfg in {"": trainer_cfg, **{f"{k}.": v for k, v in sections.items()}}.items():
        for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
            if not f.metadata.get("secret"):
                out[prefix + f.name] = getattr(cfg, f.name)
    return out


# -- the command line of a service with a configuration file ------------------------------------------
# Shared by the trainer, refscore and the labeler: `--config FILE`, `--print-config`, and (for the classes
# a service chooses) one flag per setting. The file is read before the parser is built, so each flag's
# help shows the value it would have without it (default < file < environment).

E = TypeVar("E", bound=EnvConfig)


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """The shape of one service's configuration file: `top`'s settings at the top level (flat, as the
    trainer's), each of `sections`' classes under its name (`kafka:`, `s3:` ...). `listing` says where every
    setting is listed with its help (named when a file has a key that is none of them)."""

    service: str
    top: type[EnvConfig]
    sections: Mapping[str, type[EnvConfig]]
    listing: str

    @property
    def classes(self) -> tuple[type[EnvConfig], ...]:
        return (self.top, *self.sections.values())

    def load(self, path: str | os.PathLike[str] | None) -> dict[type[EnvConfig], dict[str, Any]]:
        """The file's values by class ({} for no file); ConfigError (one line) for anything wrong in it."""
        return load_config_file(path, self.top, self.sections, self.listing) if path else {}

    def resolve(
        self,
        file_values: Mapping[type[EnvConfig], Mapping[str, Any]],
        overrides: Mapping[type[EnvConfig], Mapping[str, Any]] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Every class's configuration: defaults < file < environment < `overrides` (flags)."""
        overrides = overrides or {}
        return Settings(
            {cls: cls.from_sources(file_values.get(cls), environ, **overrides.get(cls, {})) for cls in self.classes}
        )

    def dump(self, settings: Settings) -> str:
        """`settings` as a file that `--config` reloads (secrets left out)."""
        return settings_yaml(
            self.service, settings[self.top], {name: settings[cls] for name, cls in self.sections.items()}
        )

    def add_arguments(self, p: argparse._ActionsContainer) -> None:
        """`--config FILE` and `--print-config`."""
        sections = ", ".join(f"`{name}:`" for name in self.sections)
        p.add_argument(
            "--config",
            metavar="FILE",
            help=f"YAML file of settings (--print-config writes one): the {self.service}'s own settings at the top "
            f"level, {sections} sections (examples/*.yaml); environment variables and flags override it",
        )
        p.add_argument(
            "--print-config", action="store_true", help="print the resolved configuration as YAML (a --config file)"
        )


class Settings(dict[type[EnvConfig], EnvConfig]):
    """A service's resolved configuration, by class: `settings.of(KafkaConfig)` is typed."""

    def of(self, cls: type[E]) -> E:
        value = self[cls]
        assert isinstance(value, cls)
        return value


def add_setting_flags(p: argparse._ActionsContainer, cls: type[EnvConfig], base: EnvConfig) -> None:
    """One flag per field of `cls` (`--field-name`), its default the value from the file and the environment
    (`base`), shown in the help with the variable's name. A bool gets `--x/--no-x`; a tuple is repeatable
    and/or comma-separated, as its environment variable."""
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        flag = "--" + f.name.replace("_", "-")
        default = getattr(base, f.name)
        help_ = f"{f.metadata['help']} [{f.metadata['env']}={'***' if f.metadata['secret'] else repr(default)}]"
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default, help=help_)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, dest=f.name, action="append", default=None, help=help_ + " (repeatable)")
        else:
            p.add_argument(flag, dest=f.name, type=type(f.default), default=default, help=help_)


def setting_flag_values(ns: argparse.Namespace, cls: type[EnvConfig], base: EnvConfig) -> dict[str, Any]:
    """Every field of `cls` from the flags `add_setting_flags` added (an unset flag: `base`'s value)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if isinstance(f.default, tuple):  # repeated and/or comma-separated, as the environment variable
            given = values[f.name]
            values[f.name] = (
                tuple(part.strip() for v in given for part in v.split(",") if part.strip())
                if given
                else getattr(base, f.name)
            )
    return values


def parse_settings(
    argv: Sequence[str] | None,
    layout: ConfigFile,
    build_parser: Callable[[Mapping[type[EnvConfig], EnvConfig]], argparse.ArgumentParser],
    *,
    flagged: Sequence[type[EnvConfig]] = (),
    overrides: Callable[[argparse.Namespace], Mapping[type[EnvConfig], Mapping[str, Any]]] | None = None,
) -> tuple[Settings, argparse.Namespace]:
    """A service's command line with a configuration file: defaults < `--config FILE` < OFFDPO_* environment
    variables < flags. `build_parser(bases)` returns the service's parser; it calls `layout.add_arguments`
    and `add_setting_flags(p, cls, bases[cls])` for each class of `flagged` (`bases`: each one's value from
    the file and the environment). `overrides(ns)`: values of the service's own hand-written flags, by class.
    Returns the resolved settings of every class of `layout` and the parsed namespace. A bad setting (file,
    variable, or a combination a class refuses) raises ConfigError, one line naming it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    files = layout.load(known.config)
    bases = {cls: cls.from_sources(files.get(cls)) for cls in flagged}
    ns = build_parser(bases).parse_args(argv)
    given: dict[type[EnvConfig], dict[str, Any]] = {
        cls: setting_flag_values(ns, cls, base) for cls, base in bases.items()
    }
    for cls, values in (overrides(ns) if overrides is not None else {}).items():
        given.setdefault(cls, {}).update(values)
    return layout.resolve(files, given), ns
