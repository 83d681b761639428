"""offdpo: shared code of the offline-DPO pipeline (records, Kafka/S3 clients, config, local stack)."""
__version__ = "0.1.0"
