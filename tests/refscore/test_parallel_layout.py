"""A reference split over GPUs (issue 28): OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE / _PIPELINE_PARALLEL_SIZE
reach vLLM's engine arguments and the fingerprint; a model that cannot fit is refused at start with the
bytes needed, the bytes available and the settings to change."""

from __future__ import annotations

import json

import pytest

from offdpo.errors import ConfigError
from offdpo.fingerprint import model_fingerprint
from services.refscore.config import RefscoreConfig, check_fits_gpus
from services.refscore.engines import EngineSettings, TransformersEngine, VLLMEngine

GIB = 1 << 30
QWEN2_72B = {
    "model_type": "qwen2",
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}


def _config_dir(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_settings_reach_the_engine_settings_and_name_the_layout():
    cfg = RefscoreConfig.from_env(
        {"OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE": "4", "OFFDPO_REFSCORE_PIPELINE_PARALLEL_SIZE": "2"}
    )
    settings = cfg.engine_settings()
    assert (settings.tensor_parallel_size, settings.pipeline_parallel_size) == (4, 2)
    assert settings.parallel_layout == "tp=4,pp=2" and EngineSettings().parallel_layout == ""
    with pytest.raises(ConfigError, match="OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE=0: must be >= 1"):
        RefscoreConfig(tensor_parallel_size=0).engine_settings()


def test_the_layout_is_recorded_in_the_fingerprint_but_not_its_id(tiny_model):
    kw = {"dtype": "bfloat16", "engine": "vllm", "engine_version": "x"}
    one = model_fingerprint(tiny_model, **kw)
    split = model_fingerprint(tiny_model, parallel_layout="tp=2,pp=1", **kw)
    assert split.parallel_layout == "tp=2,pp=1" and one.parallel_layout == ""
    assert split.fingerprint_id == one.fingerprint_id  # the trainer accepts scores from either layout


def test_vllm_gets_the_parallel_sizes(tiny_model, monkeypatch):
    import vllm

    seen = {}

    class Stop(Exception):
        pass

    def fake_llm(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    with pytest.raises(Stop):
        VLLMEngine(
            str(tiny_model),
            "float32",
            512,
            0.1,
            settings=EngineSettings(tensor_parallel_size=2, pipeline_parallel_size=3),
        )
    assert (seen["tensor_parallel_size"], seen["pipeline_parallel_size"]) == (2, 3)


def test_the_transformers_engine_refuses_a_split(tiny_model):
    with pytest.raises(ConfigError, match="runs the model on one device"):
        TransformersEngine(str(tiny_model), "float32", 512, settings=EngineSettings(tensor_parallel_size=2))


def test_a_reference_too_big_for_its_gpus_is_refused_naming_bytes_and_settings(tmp_path):
    model = _config_dir(tmp_path, QWEN2_72B)
    cfg = RefscoreConfig(model_dir=str(model), dtype="bfloat16", max_model_len=4096, engine="vllm")
    with pytest.raises(ConfigError) as err:
        check_fits_gpus(cfg, model, gpu_mem_bytes=80 * GIB, gpus=8)
    message = str(err.value)
    assert "does not fit" in message and "GiB" in message and "OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE" in message
    check_fits_gpus(
        RefscoreConfig(**{**cfg.__dict__, "tensor_parallel_size": 4}), model, gpu_mem_bytes=80 * GIB, gpus=8
    )
    with pytest.raises(ConfigError, match="needs 4 GPUs; 2 visible"):
        check_fits_gpus(
            RefscoreConfig(**{**cfg.__dict__, "tensor_parallel_size": 4}), model, gpu_mem_bytes=80 * GIB, gpus=2
        )


def test_a_multi_address_target_is_balanced_round_robin():
    """A headless Service resolves to every pod; pick_first (grpc's default) would send every call to
    one. The in-tree client (offdpo-client's channel) spreads calls over every address: two real gRPC
    servers behind one target both answer (ipv4: lists the addresses, as DNS would)."""
    from concurrent import futures

    import grpc

    from offdpo.refscore_client import RefscoreClient
    from offdpo.v1 import refscore_pb2, refscore_pb2_grpc

    class Named(refscore_pb2_grpc.RefScoreServicer):
        def __init__(self, name: str):
            self.name = name

        def GetModelInfo(self, request, context):
            info = refscore_pb2.ModelInfo()
            info.fingerprint.model_id = self.name
            return info

    servers, ports = [], []
    for name in ("a", "b"):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        refscore_pb2_grpc.add_RefScoreServicer_to_server(Named(name), server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        server.start()
        servers.append(server)
    try:
        with RefscoreClient("ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)) as client:
            seen = {client.model_info(timeout=10).fingerprint.model_id for _ in range(12)}
        assert seen == {"a", "b"}, f"every call went to {seen}: not round robin"
    finally:
        for server in servers:
            server.stop(None)
