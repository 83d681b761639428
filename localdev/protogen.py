"""Generate the Python modules for protos/ (records, refscore and labeler APIs), with .pyi stubs.

    python -m localdev.protogen            # regenerate into the repository (make protos)
    python -m localdev.protogen --check    # exit 1 if the checked-in modules are stale

The generated modules are checked in (offdpo/v1/*_pb2*.py) so an install needs no grpcio-tools;
tests/test_protos.py fails when they no longer match protos/.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO / "protos"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Run grpc_tools.protoc over every proto; return the generated files relative to out_dir."""
    import importlib.resources

    from grpc_tools import protoc

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return generated_files(out_dir)


# What protoc writes for a.proto: a_pb2.py, a_pb2.pyi and a_pb2_grpc.py. Only these count as generated
# code; what Python caches next to them (__pycache__/a_pb2.cpython-311.pyc, written on every import
# where bytecode writing is on, as on users' machines) is never part of the check.
_GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generated_files(root: Path) -> list[Path]:
    """The generated modules under root/offdpo, relative to root."""
    return sorted(
        p.relative_to(root)
        for p in (root / "offdpo").rglob("*_pb2*")
        if p.is_file() and p.name.endswith(_GENERATED_SUFFIXES) and "__pycache__" not in p.parts
    )


def stale_files(repo: Path = REPO) -> list[str]:
    """Generated files that differ from (or are missing in) `repo`, and checked-in ones no proto makes."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        problems = [
            str(rel)
            for rel in fresh
            if not (repo / rel).exists() or not filecmp.cmp(Path(tmp) / rel, repo / rel, shallow=False)
        ]
        checked_in = set(generated_files(repo))
        problems += [f"{rel} (no proto generates it)" for rel in sorted(checked_in - set(fresh))]
        return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the generated code is current")
    args = parser.parse_args()
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated protobuf code (run `make protos`):\n  " + "\n  ".join(stale))
            return 1
        print("generated protobuf code is current")
        return 0
    for rel in generate(REPO):
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
