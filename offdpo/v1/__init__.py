"""Generated protobuf and gRPC modules for protos/offdpo/v1 (do not edit; run `make protos`)."""
