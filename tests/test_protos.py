import py_compile
import shutil
from pathlib import Path

from localdev import protogen
from offdpo import records
from offdpo.v1 import records_pb2, refscore_pb2


def test_generated_code_is_current():
    stale = protogen.stale_files()
    assert stale == [], f"generated protobuf code is stale, run `make protos`: {stale}"


def test_stale_check_detects_an_edit(tmp_path, monkeypatch):
    # The check must be able to fail: point it at a proto tree with an extra field.
    proto_root = tmp_path / "protos"
    for src in protogen.proto_files():
        dst = proto_root / src.relative_to(protogen.PROTO_ROOT)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(src.read_text())
    rec = proto_root / "offdpo/v1/records.proto"
    rec.write_text(rec.read_text().replace("message ChatMessage {", "message ChatMessage {\n  string name = 99;"))
    monkeypatch.setattr(protogen, "PROTO_ROOT", proto_root)
    assert "offdpo/v1/records_pb2.py" in protogen.stale_files()


def _copy_generated(repo: Path) -> None:
    for rel in protogen.generated_files(protogen.REPO):
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(protogen.REPO / rel, repo / rel)


def test_bytecode_caches_are_not_generated_code(tmp_path):
    # Where Python writes bytecode (every user's machine), importing the generated modules leaves
    # __pycache__/*_pb2*.pyc next to them: they are caches, never stale generated code.
    _copy_generated(tmp_path)
    for rel in protogen.generated_files(tmp_path):
        if rel.suffix == ".py":
            cache = tmp_path / rel.parent / "__pycache__" / f"{rel.stem}.cpython-311.pyc"
            cache.parent.mkdir(exist_ok=True)
            py_compile.compile(str(tmp_path / rel), cfile=str(cache), doraise=True)
    assert list(tmp_path.rglob("__pycache__/*_pb2*.pyc"))
    assert protogen.stale_files(tmp_path) == []


def test_hand_edited_generated_module_is_stale(tmp_path):
    _copy_generated(tmp_path)
    edited = tmp_path / "offdpo/v1/records_pb2.py"
    edited.write_text(edited.read_text() + "\n# edited by hand\n")
    (tmp_path / "offdpo/v1/extra_pb2.py").write_text("# no proto makes this\n")
    assert protogen.stale_files(tmp_path) == [
        "offdpo/v1/records_pb2.py",
        "offdpo/v1/extra_pb2.py (no proto generates it)",
    ]


def test_versioned_packages():
    assert records_pb2.DESCRIPTOR.package == "offdpo.v1"
    assert refscore_pb2.DESCRIPTOR.services_by_name["RefScore"].full_name == "offdpo.v1.RefScore"


def test_pair_id_is_content_hash_and_ignores_provenance():
    prompt = records.chat_prompt([("user", "2+2?")])
    a = records.make_pair(prompt, "4", "5", records_pb2.Provenance(strategy=records_pb2.LABEL_STRATEGY_RULES))
    b = records.make_pair(prompt, "4", "5", records_pb2.Provenance(strategy=records_pb2.LABEL_STRATEGY_HUMAN))
    c = records.make_pair(prompt, "5", "4")
    assert a.pair_id == b.pair_id != c.pair_id
    assert len(a.pair_id) == 32
    # Same text as plain prompt vs chat is different content.
    assert records.make_pair(records.text_prompt("2+2?"), "4", "5").pair_id != a.pair_id
