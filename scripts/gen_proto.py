"""Regenerate the committed gRPC stubs from src/basalt/machinery/api/**/*.proto.

    python scripts/gen_proto.py [--out DIR]

Generated files are marked as such and never edited by hand; a test regenerates them
into a temporary directory and fails when the committed ones differ.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
API = SRC / "basalt" / "machinery" / "api"


def generate(out: Path) -> list[Path]:
    """Run protoc (from grpcio-tools) for every proto; returns the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    # Our API at the top; subsets of other projects' APIs (containerd) in subpackages.
    protos = sorted(str(p.relative_to(SRC)) for p in API.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{SRC}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out={tmp}",
            f"--mypy_grpc_out={tmp}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        base = Path(tmp) / "basalt" / "machinery" / "api"
        generated = sorted(p for p in base.rglob("*") if p.is_file())
        written = []
        for path in generated:
            target = out / path.relative_to(base)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            written.append(target)
        return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=API)
    args = parser.parse_args()
    for path in generate(args.out):
        print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
