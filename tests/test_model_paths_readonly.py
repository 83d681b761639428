"""Issue 17 item 10: a model path a user gives is read-only to the project. Every command that takes
one is pointed at a real model folder (a test model copied into a "user's" folder, without the
project's marker file, so nothing says the project built it) and the sha256 of each of its files
must be the same afterwards.

Covered here: refscore `serve` (the real command in its own process, transformers engine: Score and
GetModelInfo), and the TRL path (`offdpo export-trl` over shards scored from that model, refused
when OUT is the model folder, then integrations.trl_dpo's reference check reading the folder). The
trainer and `python -m bench.trainer --model` are covered by
tests/trainer/test_run_inprocess.py::test_a_users_model_folder_is_read_only_to_the_trainer_and_the_benchmark.
"""

from __future__ import annotations

import shutil

import pytest

from localdev.testmodel import build_test_model, tree_digest
from offdpo.records import scored_pairs_to_parquet
from offdpo.refscore_client import RefscoreClient, score_item
from tests.refscore.conftest import start_refscore
from tests.trainer.conftest import reference_fingerprint, scored_pairs, synthetic_tokens

MARKER = "offdpo_model.json"


@pytest.fixture(scope="module")
def users_model(tmp_path_factory):
    """A loadable Qwen2 in a folder the project does not own (no marker file)."""
    built = build_test_model(tmp_path_factory.mktemp("built") / "tiny", size="tiny")
    user = tmp_path_factory.mktemp("user") / "my-qwen2"
    shutil.copytree(built, user)
    (user / MARKER).unlink()
    assert not (user / MARKER).exists() and (user / "config.json").exists()
    return user


def test_refscore_serve_reads_a_users_model_folder_and_writes_nothing_there(users_model, tmp_path):
    before = tree_digest(users_model)
    server = start_refscore(users_model, tmp_path / "refscore.log", engine="transformers")
    try:
        with RefscoreClient(server.target) as client:
            client.wait_serving(timeout_s=300)
            info = client.model_info()
            assert info.fingerprint.fingerprint_id
            resp = client.score([score_item("Is this read-only?", "Yes, it is.", item_id="a")], timeout=120)
            assert len(resp.items) == 1 and len(resp.items[0].token_logprobs) > 0
        assert server.stop() == 0, server.log_tail()
    finally:
        server.stop()
    assert tree_digest(users_model) == before, "every file of the user's model folder is byte-identical"
    assert not (users_model / MARKER).exists()


def test_trl_export_and_reference_check_leave_a_users_model_folder_alone(users_model, tmp_path, capsys):
    from cli.main import main as offdpo
    from integrations.trl_dpo import check_reference_fingerprint
    from integrations.trl_export import dataset_fingerprint, load_trl_dataset

    before = tree_digest(users_model)
    fp = reference_fingerprint(users_model)
    shards = tmp_path / "users-shards"
    shards.mkdir()
    rows = scored_pairs(users_model, synthetic_tokens(6, seed=31), fp)
    (shards / "part-0.parquet").write_bytes(scored_pairs_to_parquet(rows, fp))
    shards_before = tree_digest(shards)

    assert offdpo(["export-trl", str(shards), str(tmp_path / "export")]) == 0
    # OUT pointed at the model folder by mistake: refused, nothing written or removed there
    assert offdpo(["export-trl", str(shards), str(users_model)]) == 2
    assert "already exists" in capsys.readouterr().err

    dataset = load_trl_dataset(tmp_path / "export")
    assert dataset.num_rows == 6
    exported = dataset_fingerprint(dataset)
    assert exported is not None and exported.fingerprint_id == fp.fingerprint_id
    check_reference_fingerprint(exported, users_model)  # loads the tokenizer and hashes the weights there

    assert tree_digest(users_model) == before, "every file of the user's model folder is byte-identical"
    assert tree_digest(shards) == shards_before, "the source shards are read-only too"
