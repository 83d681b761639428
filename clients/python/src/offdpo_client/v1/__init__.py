"""Generated protobuf and gRPC modules of offdpo.v1's refscore API (do not edit; regenerate with
clients/python/generate_protos.py). Message and service names are the wire names: offdpo.v1.ScoreRequest,
/offdpo.v1.RefScore/Score."""
