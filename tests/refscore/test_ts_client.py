"""The TypeScript client (clients/typescript) against the real refscore server: its example's scores,
and a script's over chat, plain-text and token-id items, equal the in-tree Python client's for the same
requests. Also: the committed generated code is what `npm run generate` makes from protos/ now, and the
retry rules (UNAVAILABLE retried until the deadline, FAILED_PRECONDITION never) hold on a real channel."""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from localdev.process import free_port
from offdpo.refscore_client import score_item
from offdpo.v1 import records_pb2

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "clients" / "typescript"
CACHE = REPO / ".cache" / "ts-client"  # gitignored: the install lock and npm's log
pytestmark = pytest.mark.vllm

# The example's two items (clients/typescript/examples/score.ts), as the in-tree client takes them.
EXAMPLE_PAIRS = [([("user", "What is 2+2?")], "4"), ("The capital of France is", " Paris")]
# More shapes, as JSON both clients read: chat with several messages, text with token-id answers.
PAIRS: list[tuple[str | list[list[str]], str | list[int]]] = [
    ([["system", "Be brief."], ["user", "Name a colour."]], "Blue, like the sky."),
    ("The capital of France is", [3, 17, 42]),
    ("plain prompt", "a plain answer"),
]

# Runs with node against the built client (dist/), with the server's target and PAIRS as arguments.
SCRIPT = r"""
import { RefscoreClient, RefscoreCallError, NO_RETRY } from "%(index)s";
const [target, deadPort, pairsJson] = process.argv.slice(2);
const pairs = JSON.parse(pairsJson);
const out = (r) => r.items.map((i) => ({ index: i.index, itemId: i.itemId, prompt: i.promptTokenIds,
  answer: i.answerTokenIds, logprobs: i.tokenLogprobs, sum: i.logprobSum }));
const failure = async (promise) => promise.then(() => null, (e) => {
  if (!(e instanceof RefscoreCallError)) throw e;
  return { code: e.code, attempts: e.attempts, message: e.message };
});
// dns:/// with round robin (the service config) over what "localhost" resolves to.
const client = new RefscoreClient(`dns:///localhost:${target.split(":").pop()}`, { deadlineMs: 60000 });
await client.waitServing(60000);
const scored = await client.score(pairs.map(([prompt, answer], n) => ({ prompt, answer, itemId: `id-${n}` })));
const first = scored.items[0];
const tokens = await client.score([[{ tokenIds: first.promptTokenIds }, first.answerTokenIds]]);
const info = await client.modelInfo();
const unknownModel = await failure(client.score(pairs, { expectedFingerprintId: "no-such-model" }));
client.close();
// Nothing listens on deadPort: UNAVAILABLE, retried with backoff within the deadline; NO_RETRY: once.
const dead = new RefscoreClient(`127.0.0.1:${deadPort}`, { deadlineMs: 1500, retry: { initialBackoffMs: 50 } });
const started = Date.now();
const retried = { ...(await failure(dead.score(pairs))), ms: Date.now() - started };
dead.close();
const noRetry = new RefscoreClient(`127.0.0.1:${deadPort}`, { retry: NO_RETRY });
const single = await failure(noRetry.score(pairs));
noRetry.close();
console.log(JSON.stringify({ score: out(scored), tokens: out(tokens), fingerprint: scored.fingerprint,
  infoFingerprint: info.fingerprint, maxItems: info.maxItemsPerRequest, unknownModel, retried, single }));
"""

GRPC_UNAVAILABLE, GRPC_FAILED_PRECONDITION = 14, 9
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "ENETUNREACH")


def _run(args, **kw) -> subprocess.CompletedProcess:
    run = subprocess.run(args, capture_output=True, text=True, **kw)
    assert run.returncode == 0, f"{' '.join(map(str, args))} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def _npm_reachable() -> bool:
    try:
        return subprocess.run(["npm", "ping"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _install_and_build(tmp_path: Path) -> None:
    """`npm ci` (quiet; its output in .cache/ts-client/npm-ci.log) when node_modules is missing or older
    than package-lock.json, then `tsc`. One at a time: npm ci empties node_modules first."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm are not installed: the TypeScript client cannot be built")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        installed = PKG / "node_modules" / ".package-lock.json"
        if not installed.exists() or installed.stat().st_mtime < (PKG / "package-lock.json").stat().st_mtime:
            log = CACHE / "npm-ci.log"
            with open(log, "w") as out:
                run = subprocess.run(
                    ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                    cwd=PKG,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    timeout=600,
                )
            if run.returncode != 0:
                text = log.read_text(errors="replace")
                if any(e in text for e in NETWORK_ERRORS) and not _npm_reachable():
                    pytest.skip(f"the npm registry is unreachable, so `npm ci` failed (log: {log})")
                pytest.fail(f"npm ci failed in {PKG}; {log} ends:\n{text[-3000:]}")
        # The committed generated code is what protos/ generates now (buf and protoc-gen-es, pinned).
        _run(["npm", "run", "--silent", "generate", "--", "--output", str(tmp_path / "gen")], cwd=PKG, timeout=300)
        fresh, committed = tmp_path / "gen" / "src" / "gen", PKG / "src" / "gen"
        files = {p.relative_to(fresh) for p in fresh.rglob("*.ts")} | {
            p.relative_to(committed) for p in committed.rglob("*.ts")
        }
        stale = sorted(
            str(f)
            for f in files
            if not (
                (fresh / f).is_file()
                and (committed / f).is_file()
                and (fresh / f).read_bytes() == (committed / f).read_bytes()
            )
        )
        assert not stale, f"clients/typescript/src/gen is not what protos/ generates: run `npm run generate` ({stale})"
        _run(["npm", "run", "--silent", "build"], cwd=PKG, timeout=300)


def _in_tree(items) -> list[dict]:
    return [
        dict(
            index=i.item_index,
            itemId=i.item_id,
            prompt=list(i.prompt_token_ids),
            answer=list(i.answer_token_ids),
            logprobs=list(i.token_logprobs),
            sum=i.logprob_sum,
        )
        for i in items
    ]


def test_the_typescript_client_scores_as_the_python_client(vllm_server, vllm_client, tmp_path):
    _install_and_build(tmp_path)

    # The README's example, run as a user runs it: equal to the in-tree client's scores, to the bit.
    example = _run(["node", "dist/examples/score.js", vllm_server.target], cwd=PKG, timeout=120)
    got = json.loads(example.stdout.strip().splitlines()[-1])
    expected = vllm_client.score([score_item(p, a) for p, a in EXAMPLE_PAIRS])
    assert got["fingerprintId"] == expected.fingerprint.fingerprint_id != ""
    assert got["items"] == [
        dict(answerTokenIds=list(i.answer_token_ids), tokenLogprobs=list(i.token_logprobs), logprobSum=i.logprob_sum)
        for i in expected.items
    ]

    script = tmp_path / "check.mjs"
    script.write_text(SCRIPT % {"index": (PKG / "dist" / "src" / "index.js").as_uri()})
    run = _run(["node", str(script), vllm_server.target, str(free_port()), json.dumps(PAIRS)], cwd=PKG, timeout=120)
    got = json.loads(run.stdout.strip().splitlines()[-1])

    items = [
        score_item(p if isinstance(p, str) else [tuple(m) for m in p], a, f"id-{n}") for n, (p, a) in enumerate(PAIRS)
    ]
    expected = vllm_client.score(items)
    assert got["score"] == _in_tree(expected.items)
    first = expected.items[0]
    prompt = records_pb2.Prompt(token_ids=records_pb2.TokenIds(ids=first.prompt_token_ids))
    assert got["tokens"] == _in_tree(vllm_client.score([score_item(prompt, list(first.answer_token_ids))]).items)
    fp = expected.fingerprint
    want = dict(
        fingerprintId=fp.fingerprint_id,
        modelId=fp.model_id,
        weightsHash=fp.weights_hash,
        tokenizerHash=fp.tokenizer_hash,
        chatTemplateHash=fp.chat_template_hash,
        dtype=fp.dtype,
        engine=fp.engine,
        engineVersion=fp.engine_version,
        parallelLayout=fp.parallel_layout,
    )
    assert got["fingerprint"] == want and got["infoFingerprint"] == want
    assert got["maxItems"] == vllm_client.model_info().max_items_per_request > 0

    # Not retryable: one attempt. UNAVAILABLE: retried with backoff until the 1.5 s deadline; NO_RETRY: once.
    assert got["unknownModel"]["code"] == GRPC_FAILED_PRECONDITION and got["unknownModel"]["attempts"] == 1
    assert got["retried"]["code"] == GRPC_UNAVAILABLE and got["retried"]["attempts"] >= 3, got["retried"]
    assert got["retried"]["ms"] < 1500 + 500, got["retried"]
    assert got["single"]["code"] == GRPC_UNAVAILABLE and got["single"]["attempts"] == 1, got["single"]
