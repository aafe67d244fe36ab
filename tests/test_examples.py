"""examples/: gRPC clients of the router in other languages, generated from protos/ (issue 21). Each one is built
where its toolchain is installed and run against a real router and tiny worker: a streamed majority vote prints its
progress and the answer, a bad parameter fails with INVALID_ARGUMENT naming it. Where a toolchain is missing the
test says what to install and skips; nothing here installs system packages. The Node example's dependencies come
from the npm registry (`npm ci`, once per package-lock.json); builds are cached under .cache/examples.

Also, in-process: the router's message for a parameter of the wrong type says what arrived in the wire's terms
(a google.protobuf.Value), which is what a client in another language can act on."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from google.protobuf import struct_pb2

from controllers import ParamError
from controllers.majority_vote import MajorityVote
from router.convert import struct_to_dict

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CACHE = REPO / ".cache" / "examples"

# Four samples of four tokens, each voting for its first character: the tiny model's text has no numbers, and the
# seed makes the votes the same every run.
VOTE_ARGS = ["--params", json.dumps({"n": 4, "extractor": "regex", "pattern": "(?s)(.)", "stop_decided": False}),
             "--max-tokens", "4", "--seed", "7", "--deadline", "60"]
BAD_ARGS = ["--params", '{"n": "8"}', "--deadline", "60"]


# ---- the wrong-type message, in wire terms ----------------------------------------------------------------------

def _struct(**values: struct_pb2.Value) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    for key, value in values.items():
        s.fields[key].CopyFrom(value)
    return s


def _value(**kind) -> struct_pb2.Value:
    v = struct_pb2.Value()
    if "list_value" in kind:
        v.list_value.extend(kind["list_value"])
    elif "struct_value" in kind:
        v.struct_value.update(kind["struct_value"])
    else:
        for name, value in kind.items():
            setattr(v, name, value)
    return v


EMPTY = "no value (a null or empty google.protobuf.Value; protobufjs users: "


@pytest.mark.parametrize("name,value,message", [
    # what protobufjs sends for {n: {number_value: 8}}: a Value with no kind set
    ("n", _value(), f"params.n: expected a number, got {EMPTY}numberValue, not number_value)"),
    ("n", _value(null_value=struct_pb2.NULL_VALUE), f"params.n: expected a number, got {EMPTY}numberValue, not "
                                                    "number_value)"),
    ("n", _value(string_value="8"), 'params.n: expected a number, got a string ("8")'),
    ("n", _value(bool_value=True), "params.n: expected a number, got a bool (true)"),
    ("n", _value(list_value=[8]), "params.n: expected a number, got a list ([8])"),
    ("n", _value(struct_value={"value": 8}), 'params.n: expected a number, got a struct ({"value": 8})'),
    ("n", _value(number_value=2.5), "params.n: expected a whole number, got a number (2.5)"),
    ("stop_decided", _value(number_value=1), "params.stop_decided: expected a bool, got a number (1)"),
    ("extractor", _value(), f"params.extractor: expected a string, got {EMPTY}stringValue, not string_value)"),
])
def test_wrong_type_says_what_arrived(name, value, message):
    with pytest.raises(ParamError) as info:
        MajorityVote.from_params(struct_to_dict(_struct(**{name: value})))
    assert str(info.value) == message and info.value.field == f"params.{name}"


def test_numbers_arrive_as_doubles_and_whole_ones_are_ints():
    controller = MajorityVote.from_params(struct_to_dict(_struct(n=_value(number_value=8))))
    assert controller.n == 8 and isinstance(controller.n, int)


def test_a_long_value_is_cut_short():
    with pytest.raises(ParamError) as info:
        MajorityVote.from_params({"n": "8" * 500})
    assert len(info.value.message) < 100 and info.value.message.endswith('...)')


# ---- running the examples -------------------------------------------------------------------------------------

def _run(argv: list[str], cwd: Path, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("TRELLIS_ROUTER", "TRELLIS_TOKEN", "TRELLIS_TLS_CA")}
    return subprocess.run(argv, cwd=cwd, env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def _check_vote(proc: subprocess.CompletedProcess) -> None:
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{out}\nstderr:\n{proc.stderr}"
    assert re.search(r"^\s*\d+ ms  started majority_vote \{.*\"n\":4", out, re.M), out
    assert re.search(r"^\s*\d+ ms  progress sampling 0/4: drawing 4 samples$", out, re.M), out
    assert len(re.findall(r"^\s*\d+ ms  vote sample/\d: \".+\" \(tally \{.+\}\)$", out, re.M)) == 4, out
    assert re.search(r"^\s*\d+ ms  progress voting 4/4: 4 of 4 samples gave an answer$", out, re.M), out
    assert re.search(r"^answer: .+$", out, re.M), out
    assert re.search(r"^votes: \{.+\} share [0-9.]+$", out, re.M), out
    assert re.search(r"^usage: 16 completion tokens in 1 tasks, \d+ ms$", out, re.M), out


def _check_bad_param(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 1, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert 'error: INVALID_ARGUMENT (3): params.n: expected a number, got a string ("8")' in proc.stderr
    assert "  field: params.n" in proc.stderr.splitlines()     # from google.rpc.BadRequest in the status details
    assert "answer:" not in proc.stdout


# -- Node.js: @grpc/grpc-js and @grpc/proto-loader, loading protos/ at run time

NODE = EXAMPLES / "node"


@pytest.fixture(scope="session")
def node_example() -> Path:
    """examples/node with its node_modules, installed by `npm ci` once per package-lock.json."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm not installed: apt-get install nodejs npm (Node.js >= 18)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0] or 0) < 18:
        pytest.skip(f"Node.js {version} is too old for @grpc/grpc-js 1.14: Node.js >= 18 needed")
    lock = hashlib.sha256((NODE / "package-lock.json").read_bytes()).hexdigest()
    stamp = NODE / "node_modules" / ".trellis-npm-ci"
    if not stamp.exists() or stamp.read_text() != lock:
        try:
            proc = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=NODE,
                                  capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip("npm ci timed out after 300 s (is the npm registry reachable?)")
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if line.startswith("npm error")][:3]
            pytest.skip(f"npm ci failed (is the npm registry reachable?): {' / '.join(errors)[:500]}")
        stamp.write_text(lock)
    return NODE


@pytest.mark.processes
def test_node_streamed_majority_vote(node_example, tiny_router):
    # the router's address from TRELLIS_ROUTER (the other Node tests pass it as the argument)
    _check_vote(_run(["node", "majority_vote.js", *VOTE_ARGS], node_example,
                     env={"TRELLIS_ROUTER": tiny_router.address}))


@pytest.mark.processes
def test_node_bad_parameter(node_example, tiny_router):
    _check_bad_param(_run(["node", "majority_vote.js", tiny_router.address, *BAD_ARGS], node_example))


@pytest.mark.processes
def test_node_struct_trap_is_named(node_example, tiny_router):
    """The trap the examples explain: protobufjs' Struct is camelCase, so number_value is dropped and the Value
    arrives empty; the router's message says so and names the field to write instead."""
    script = """
      const grpc = require('@grpc/grpc-js'), loader = require('@grpc/proto-loader');
      const def = loader.loadSync('trellis/v1/router.proto', {includeDirs: ['../../protos'], keepCase: true});
      const client = new (grpc.loadPackageDefinition(def).trellis.v1.Router)(process.argv[1],
                                                                              grpc.credentials.createInsecure());
      client.Run({controller: 'majority_vote', prompt: {text: 'hi'}, params: {fields: {n: {number_value: 8}}}},
                 (err) => { console.log(err ? `${err.code} ${err.details}` : 'no error'); client.close(); });
    """
    proc = _run(["node", "-e", script, tiny_router.address], node_example)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("3 params.n: expected a number, got no value (a null or empty "
                                   "google.protobuf.Value; protobufjs users: numberValue, not number_value)")


# -- C++: stubs generated by protoc and grpc_cpp_plugin at build time, Debian's gRPC

CPP = EXAMPLES / "cpp"
CPP_PACKAGES = "g++ make pkg-config protobuf-compiler protobuf-compiler-grpc libgrpc++-dev"


@pytest.fixture(scope="session")
def cpp_example() -> Path:
    """examples/cpp built under .cache/examples/cpp (make rebuilds only what changed)."""
    missing = [tool for tool in (os.environ.get("CXX", "g++"), "make", "pkg-config", "protoc", "grpc_cpp_plugin")
               if not shutil.which(tool)]
    if not missing and subprocess.run(["pkg-config", "--exists", "grpc++", "protobuf"]).returncode != 0:
        missing.append("grpc++ and protobuf development files (pkg-config grpc++ protobuf)")
    if missing:
        pytest.skip(f"C++ gRPC toolchain not installed ({', '.join(missing)} missing): apt-get install {CPP_PACKAGES}")
    build = CACHE / "cpp"
    proc = subprocess.run(["make", "-C", str(CPP), f"BUILD={build}", f"-j{min(os.cpu_count() or 1, 4)}"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"make failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return build / "majority_vote"


@pytest.mark.processes
def test_cpp_streamed_majority_vote(cpp_example, tiny_router):
    _check_vote(_run([str(cpp_example), tiny_router.address, *VOTE_ARGS], CPP))


@pytest.mark.processes
def test_cpp_bad_parameter(cpp_example, tiny_router):
    # the router's address from TRELLIS_ROUTER (the other C++ test passes it as the argument)
    _check_bad_param(_run([str(cpp_example), *BAD_ARGS], CPP, env={"TRELLIS_ROUTER": tiny_router.address}))
