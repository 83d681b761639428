"""Regenerate offdpo_client/v1 (the refscore API's generated modules) from protos/.

    python3 clients/python/generate_protos.py           # rewrite src/offdpo_client/v1/*_pb2*
    python3 clients/python/generate_protos.py --check   # exit 1 if they differ from what it would write

Run it after `make protos` whenever protos/offdpo/v1/{refscore,records}.proto change
(tests/test_client_package.py fails until the copies carry the same descriptors as offdpo/v1).

Why another protoc than `make protos`: the client supports Python 3.9, and so generates with
grpcio-tools 1.80.0, the last release for 3.9. Its gencode (protobuf 6.31.1) runs on protobuf
6.31.1 and later, 7.x included (protobuf's runtime accepts gencode of its own and the previous major
version), and its stubs on grpcio 1.80.0 and later. The descriptors are byte-identical to offdpo/v1's,
so both may be imported into one process. The tool is installed into a throwaway virtual environment
from the package index (network needed), never into the project's.

The modules keep the proto file names (offdpo/v1/refscore.proto): only the Python import lines are
rewritten from `offdpo.v1` to `offdpo_client.v1`, so the package needs nothing from the `offdpo` one.
"""

from __future__ import annotations

import argparse
import filecmp
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROTO_ROOT = REPO / "protos"
OUT = HERE / "src" / "offdpo_client" / "v1"
GRPCIO_TOOLS = "grpcio-tools==1.80.0"
PROTOS = ["offdpo/v1/records.proto", "offdpo/v1/refscore.proto"]  # refscore's API and what it imports
# What is shipped: records' gRPC module would be empty (no services there).
SHIPPED = ["records_pb2.py", "records_pb2.pyi", "refscore_pb2.py", "refscore_pb2.pyi", "refscore_pb2_grpc.py"]


def _tool_python(work: Path) -> Path:
    env_dir = work / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", GRPCIO_TOOLS], check=True)
    return python


def generate(out_dir: Path) -> None:
    """Write the SHIPPED modules into out_dir (imports rewritten for offdpo_client.v1)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        python = _tool_python(work)
        raw = work / "out"
        raw.mkdir()
        subprocess.run(
            [
                str(python),
                "-c",
                "import sys, importlib.resources as r; from grpc_tools import protoc; "
                "sys.exit(protoc.main(['protoc', '-I' + str(r.files('grpc_tools') / '_proto')] + sys.argv[1:]))",
                f"-I{PROTO_ROOT}",
                f"--python_out={raw}",
                f"--pyi_out={raw}",
                f"--grpc_python_out={raw}",
                *PROTOS,
            ],
            check=True,
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED:
            text = (raw / "offdpo" / "v1" / name).read_text()
            (out_dir / name).write_text(text.replace("from offdpo.v1 import", "from offdpo_client.v1 import"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that the checked-in modules are current")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        print(f"wrote {', '.join(SHIPPED)} into {OUT.relative_to(REPO)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in SHIPPED if not (OUT / n).exists() or not filecmp.cmp(Path(tmp) / n, OUT / n, shallow=False)]
    if stale:
        print(f"stale in {OUT.relative_to(REPO)} (run python3 clients/python/generate_protos.py): {', '.join(stale)}")
        return 1
    print("offdpo_client's generated modules are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
