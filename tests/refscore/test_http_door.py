"""refscore's OpenAI-compatible HTTP door (services/refscore/http_door.py) against a real `serve` process
(the transformers engine, team tokens from an auth file, gRPC and HTTP on one engine): the seed's recipe
through the `openai` client gives Score's per-token values; refusals and bad requests are OpenAI-shaped.
"""

from __future__ import annotations

import json
import secrets

import httpx
import openai
import pytest

from localdev.process import free_port
from offdpo.refscore_client import RefscoreClient, score_item
from offdpo.v1 import records_pb2, refscore_pb2
from services.refscore import security
from services.refscore.config import RefscoreConfig
from services.refscore.errors import InvalidArgument
from services.refscore.http_door import fingerprint_headers, parse_completion
from tests.refscore.conftest import start_refscore

pytestmark = pytest.mark.engine

TOKENS = {name: f"tok-{name}-{secrets.token_urlsafe(16)}" for name in ("scorer", "scoreonly", "metered")}
TEAMS = {
    "scorer": {},
    "scoreonly": {"methods": ["Score", "GetModelInfo"]},  # may not sample (Generate)
    "metered": {"tokens_per_minute": 40},
}
X = "The capital of France is"
Y = " Paris, and the capital of Italy is Rome."
TOL = 1e-6


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("http-door")
    auth = d / "auth.json"
    auth.write_text(
        json.dumps({"teams": {n: {"token_sha256": [security.token_hash(TOKENS[n])], **s} for n, s in TEAMS.items()}})
    )
    http_port = free_port()
    proc = start_refscore(
        tiny_model,
        d / "refscore.log",
        engine="transformers",
        extra_env={
            "OFFDPO_REFSCORE_HTTP_PORT": str(http_port),
            "OFFDPO_REFSCORE_AUTH_FILE": str(auth),
            "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "false",
        },
    )
    client = RefscoreClient(proc.target, token=TOKENS["scorer"])
    try:
        try:
            client.wait_serving(timeout_s=180)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\nserver log tail:\n{proc.log_tail()}") from None
        yield proc, client, f"http://127.0.0.1:{http_port}/v1"
    finally:
        client.close()
        code = proc.stop()
        assert code == 0, f"refscore exited with {code} on SIGTERM; log tail:\n{proc.log_tail()}"


def _openai(base_url: str, token: str | None = TOKENS["scorer"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=token or "EMPTY", max_retries=0, timeout=60)


def test_seed_recipe_gets_scores_per_token(server):
    _, grpc_client, base_url = server
    model_id = grpc_client.model_info().fingerprint.model_id
    # The seed's call: <x, y> as one prompt, one token generated, the prompt's log-probs echoed.
    raw = _openai(base_url).completions.with_raw_response.create(
        model=model_id, prompt=X + Y, max_tokens=1, echo=True, logprobs=0, extra_body={"prompt_logprobs": 0}
    )
    response = raw.parse()
    scored = grpc_client.score([score_item(X, Y)]).items[0]
    fp = grpc_client.model_info().fingerprint
    prompt_ids, answer_ids = list(scored.prompt_token_ids), list(scored.answer_token_ids)
    n = len(prompt_ids) + len(answer_ids)

    choice = response.choices[0]
    prompt_logprobs = choice.model_extra["prompt_logprobs"]  # vLLM's shape: None, then {id: {logprob, ...}}
    assert len(prompt_logprobs) == n and prompt_logprobs[0] is None
    positions = [next(iter(entry.items())) for entry in prompt_logprobs[1:]]
    assert [int(t) for t, _ in positions] == prompt_ids[1:] + answer_ids  # the same tokens as Score's
    y_values = [v["logprob"] for _, v in positions[-len(answer_ids) :]]
    assert max(abs(a - b) for a, b in zip(y_values, scored.token_logprobs)) <= TOL
    assert all(v["rank"] is None and isinstance(v["decoded_token"], str) for _, v in positions)

    # OpenAI's echo + logprobs: every prompt token (the first without a value), then the sampled one.
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[len(prompt_ids) : n], scored.token_logprobs)) <= TOL
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:k]) for k in range(n + 1)]
    assert all(lp.top_logprobs[k] == {lp.tokens[k]: lp.token_logprobs[k]} for k in range(1, n + 1))
    assert choice.text.startswith(X + Y) and response.usage.completion_tokens == 1
    assert response.usage.prompt_tokens == n

    # The fingerprint of the model that answered, as headers and as system_fingerprint.
    assert raw.headers["x-offdpo-fingerprint-id"] == fp.fingerprint_id == response.system_fingerprint
    assert raw.headers["x-offdpo-model-id"] == fp.model_id and raw.headers["x-offdpo-dtype"] == fp.dtype


@pytest.mark.vllm
def test_seed_recipe_on_the_vllm_engine(vllm_server, vllm_client):
    """The shared vLLM-backed server (conftest.py): the same recipe, the same values as its Score."""
    base_url = f"http://127.0.0.1:{vllm_server.env['OFFDPO_REFSCORE_HTTP_PORT']}/v1"
    response = _openai(base_url, token=None).completions.create(
        model="", prompt=X + Y, max_tokens=1, echo=True, logprobs=0, extra_body={"prompt_logprobs": 0}
    )
    scored = vllm_client.score([score_item(X, Y)]).items[0]
    entries = response.choices[0].model_extra["prompt_logprobs"][-len(scored.answer_token_ids) :]
    assert [int(next(iter(e))) for e in entries] == list(scored.answer_token_ids)
    got = [next(iter(e.values()))["logprob"] for e in entries]
    assert max(abs(a - b) for a, b in zip(got, scored.token_logprobs)) <= TOL
    assert response.system_fingerprint == vllm_client.model_info().fingerprint.fingerprint_id


def test_token_id_prompts_score_only(server):
    _, grpc_client, base_url = server
    a, b = [5, 17, 42, 9, 100, 3], [7, 8, 9]
    response = _openai(base_url).completions.create(
        model="", prompt=[a, b], max_tokens=0, echo=True, logprobs=3, extra_body={"prompt_logprobs": 2}
    )
    assert [c.index for c in response.choices] == [0, 1] and response.usage.completion_tokens == 0
    ids = lambda xs: records_pb2.Prompt(token_ids=records_pb2.TokenIds(ids=xs))  # noqa: E731
    for choice, seq in zip(response.choices, (a, b)):
        item = refscore_pb2.ScoreItem(prompt=ids(seq[:1]), answer_token_ids=records_pb2.TokenIds(ids=seq[1:]))
        want = grpc_client.score([item]).items[0].token_logprobs
        got = choice.logprobs.token_logprobs
        assert got[0] is None and len(got) == len(seq) and choice.finish_reason == "length"
        assert max(abs(x - y) for x, y in zip(got[1:], want)) <= TOL
        assert [next(iter(e)) for e in choice.model_extra["prompt_logprobs"][1:]] == [str(t) for t in seq[1:]]


def test_models_and_sampling(server):
    _, grpc_client, base_url = server
    fp = grpc_client.model_info().fingerprint
    models = _openai(base_url).models.list()
    assert [(m.id, m.model_extra["offdpo_fingerprint_id"]) for m in models.data] == [(fp.model_id, fp.fingerprint_id)]
    # A model may be named by its fingerprint id too; max_tokens > 1 samples through the Generate path.
    response = _openai(base_url).completions.create(
        model=fp.fingerprint_id, prompt=X, max_tokens=4, temperature=0, n=2, logprobs=0
    )
    assert len(response.choices) == 2 and response.choices[0].text == response.choices[1].text  # greedy
    lp = response.choices[0].logprobs
    assert 1 <= len(lp.tokens) <= 4 and all(v is not None and v <= 0 for v in lp.token_logprobs)


def test_refusals(server):
    _, _, base_url = server
    call = dict(model="", prompt=X + Y, max_tokens=0, echo=True, logprobs=0)
    with pytest.raises(openai.AuthenticationError) as no_token:
        _openai(base_url, token="EMPTY").completions.create(**call)
    assert no_token.value.status_code == 401 and "Bearer" in no_token.value.message
    r = httpx.post(f"{base_url}/completions", json=call)  # no Authorization header at all
    assert r.status_code == 401 and "missing credentials" in r.json()["error"]["message"]
    assert r.headers["www-authenticate"].startswith("Bearer") and "x-offdpo-fingerprint-id" in r.headers
    # A team without Generate may score (max_tokens=0) but not sample.
    scoreonly = _openai(base_url, TOKENS["scoreonly"])
    assert scoreonly.completions.create(**call).choices[0].logprobs.token_logprobs[0] is None
    with pytest.raises(openai.PermissionDeniedError) as denied:
        scoreonly.completions.create(**{**call, "max_tokens": 1})
    assert "may not call Generate" in denied.value.message and "max_tokens=0" in denied.value.message
    # Tokens per minute: a request larger than the team's minute is refused outright, an empty bucket
    # with a Retry-After.
    auth = {"authorization": f"Bearer {TOKENS['metered']}"}
    big = httpx.post(f"{base_url}/completions", json={**call, "prompt": "word " * 60}, headers=auth)
    assert big.status_code == 400 and "split it" in big.json()["error"]["message"]  # retrying cannot help
    small = {**call, "prompt": "one two three four five six seven eight nine ten"}
    answers = []
    while len(answers) < 10 and (not answers or answers[-1].status_code == 200):
        answers.append(httpx.post(f"{base_url}/completions", json=small, headers=auth))
    assert answers[0].status_code == 200 and answers[-1].status_code == 429, [a.text for a in answers]
    assert float(answers[-1].headers["retry-after"]) >= 1
    assert answers[-1].json()["error"]["type"] == "rate_limit_error"


def test_bad_requests_say_what_to_fix(server):
    _, _, base_url = server
    auth = {"authorization": f"Bearer {TOKENS['scorer']}"}
    cases = {
        "stream": ({"prompt": X, "max_tokens": 0, "echo": True, "stream": True}, 400, "stream=True is not supported"),
        "no prompt": ({"max_tokens": 0, "echo": True}, 400, "prompt is missing"),
        "logprobs": ({"prompt": X, "max_tokens": 0, "echo": True, "logprobs": 100}, 400, "logprobs=100 must be"),
        "bad ids": (
            {"prompt": [1, 10**9], "max_tokens": 0, "echo": True, "logprobs": 0},
            400,
            "outside the vocabulary",
        ),
        "model": ({"model": "gpt-4", "prompt": X, "max_tokens": 0, "echo": True}, 404, "'gpt-4' does not exist"),
    }
    for name, (body, status, text) in cases.items():
        r = httpx.post(f"{base_url}/completions", json=body, headers=auth)
        assert r.status_code == status, (name, r.text)
        error = r.json()["error"]
        assert text in error["message"] and error["type"] and error["code"], (name, error)
        assert "x-offdpo-fingerprint-id" in r.headers
    r = httpx.post(f"{base_url}/chat/completions", json={}, headers=auth)  # not served: said so, OpenAI-shaped
    assert r.status_code == 404 and "POST /v1/completions" in r.json()["error"]["message"]
    assert "x-offdpo-fingerprint-id" in r.headers
    r = httpx.post(f"{base_url}/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        _openai(base_url).completions.create(model="", prompt=X, max_tokens=0)
    assert "echo=true" in bad.value.message


# -- the request parser alone (no server) ------------------------------------------------------------
def test_parse_completion_shapes_and_limits():
    cfg = RefscoreConfig(max_generate_tokens=64, max_generate_n=4)
    p = parse_completion({"prompt": ["a", [1, 2]], "max_tokens": 1, "echo": True, "logprobs": 0}, cfg)
    assert p.prompts == ["a", [1, 2]] and p.scores and p.n == 1
    assert parse_completion({"prompt": [3, 4], "echo": True, "max_tokens": 0}, cfg).prompts == [[3, 4]]
    assert not parse_completion({"prompt": "a"}, cfg).scores  # default max_tokens 16: sampling only
    for body, text in [
        ({"prompt": "a", "max_tokens": 65}, "max_tokens=65 must be an integer between 0 and 64"),
        ({"prompt": "a", "n": 5}, "n=5"),
        ({"prompt": [], "echo": True}, "not empty"),
        ({"prompt": [[1], "a", {}]}, "prompt[2]"),
        ({"prompt": "a", "logprobs": True}, "logprobs=True"),
        ({"prompt": "a", "stop": ["\n"]}, "stop=['\\n'] is not supported"),
        ({"prompt": "a", "best_of": 3}, "best_of=3"),
        ([1, 2], "JSON object"),
    ]:
        with pytest.raises(InvalidArgument, match=None) as exc:
            parse_completion(body, cfg)
        assert text in str(exc.value), (body, str(exc.value))


def test_fingerprint_headers_name_every_field():
    fp = records_pb2.ReferenceFingerprint(model_id="m", fingerprint_id="f" * 16, dtype="float32", engine="vllm")
    assert fingerprint_headers(fp) == {
        "x-offdpo-model-id": "m",
        "x-offdpo-fingerprint-id": "f" * 16,
        "x-offdpo-dtype": "float32",
        "x-offdpo-engine": "vllm",
    }
    assert fingerprint_headers(None) == {}
