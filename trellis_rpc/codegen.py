"""Generate the Python stubs in trellis_rpc/v1 from protos/trellis/v1/*.proto.

    python -m trellis_rpc.codegen            # rewrite the checked-in stubs
    python -m trellis_rpc.codegen --out DIR  # write them elsewhere (the staleness test compares)

protoc names Python modules after the proto path (trellis.v1); the stubs live in this package,
so their cross-imports are rewritten to trellis_rpc.v1.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "trellis" / "v1"
STUB_DIR = Path(__file__).resolve().parent / "v1"
_IMPORT = re.compile(r"^from trellis\.v1 import ", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs into out_dir and return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_DIR.glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed: " + " ".join(args))
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / "trellis" / "v1").iterdir()):
            dst = out_dir / src.name
            dst.write_text(_IMPORT.sub("from trellis_rpc.v1 import ", src.read_text()))
            written.append(dst)
        init = out_dir / "__init__.py"
        init.write_text('"""Generated from protos/trellis/v1 by `python -m trellis_rpc.codegen`; do not edit."""\n')
        written.append(init)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=STUB_DIR)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out.parent) if args.out == STUB_DIR else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
