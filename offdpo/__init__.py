"""offdpo: the runtime library every service shares (records and shards, Kafka and S3 clients,
configuration, fingerprints, log-prob helpers, health, shutdown, typed errors, the refscore client).
It imports nothing above it: no service, no local-development tool."""

__version__ = "0.1.0"
