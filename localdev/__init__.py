"""Tools for local development and tests: the embedded Kafka + S3 stack, deterministic test models,
vLLM's OpenAI server as a demo judge, and the protobuf code generator. Never imported by a service."""
