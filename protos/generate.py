"""Regenerate the gRPC stubs from protos/together.proto.

    python protos/generate.py          # rewrite together_pb2.py, together_pb2.pyi, together_pb2_grpc.py
    python protos/generate.py --check  # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "together.proto"
OUTPUTS = ("together_pb2.py", "together_pb2.pyi", "together_pb2_grpc.py")


def _protoc(out_dir: Path) -> None:
    from grpc_tools import protoc  # imported lazily: only needed when (re)generating

    import grpc_tools

    include = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{HERE}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")
    grpc_file = out_dir / "together_pb2_grpc.py"
    text = grpc_file.read_text()
    # protoc emits a top-level `import together_pb2`, which only works with protos/ on sys.path.
    text = re.sub(r"^import together_pb2 as", "from protos import together_pb2 as", text, flags=re.M)
    grpc_file.write_text(text)


def generate(out_dir: Path = HERE) -> None:
    """Write the stubs for together.proto into out_dir."""
    _protoc(out_dir)


def stale_files() -> list[str]:
    """Names of committed stubs that differ from freshly generated ones (or are missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        _protoc(fresh)
        stale = []
        for name in OUTPUTS:
            current = HERE / name
            if not current.exists() or current.read_bytes() != (fresh / name).read_bytes():
                stale.append(name)
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(
                f"protos: stale generated stubs: {', '.join(stale)}; "
                "regenerate them with `python protos/generate.py` and commit the result",
                file=sys.stderr,
            )
            return 1
        print("protos: stubs are up to date")
        return 0
    generate()
    print(f"protos: wrote {', '.join(OUTPUTS)} in {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
