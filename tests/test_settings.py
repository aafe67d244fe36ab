"""The configuration system (trellis_settings) through the router's and the gateway's real command lines:
precedence, every refusal naming the setting, --print-config, the example file, the generated reference, and
reloads of a running router (SIGHUP and file change) that keep the old settings when the new file is bad."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import tomllib
from pathlib import Path

import grpc
import pytest

from client.launcher import start_router
from router.cli import parse_args as router_args
from router.settings import RouterSettings
from trellis_settings.layers import PROCESSES, load
from trellis_settings.parser import render
from trellis_settings.reference import DOC, model_of, rewritten

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "trellis.example.toml"


def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        router_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("TRELLIS_ROUTER__") or key in ("TRELLIS_WORKERS", "TRELLIS_CONFIG", "TRELLIS_METRICS_PORT"):
            monkeypatch.delenv(key)


def test_flag_over_env_over_file_over_default(tmp_path, monkeypatch):
    config = tmp_path / "trellis.toml"
    config.write_text('[router.admission]\nmax_queued_runs = 10\nmax_running_runs = 3\nmax_runs_per_client = 4\n'
                      '[router.discovery]\nworkers = "127.0.0.1:1"\n')
    monkeypatch.setenv("TRELLIS_ROUTER__ADMISSION__MAX_QUEUED_RUNS", "20")
    monkeypatch.setenv("TRELLIS_ROUTER__ADMISSION__MAX_RUNNING_RUNS", "5")
    args = router_args(["--config", str(config), "--max-queued-runs", "30"])
    a = args.configured.settings.admission
    assert (a.max_queued_runs, a.max_running_runs, a.max_runs_per_client) == (30, 5, 4)
    assert args.max_queued_runs == 30 and args.max_running_runs == 5 and args.worker_list == ["127.0.0.1:1"]
    assert args.configured.settings.limits.max_n == 64           # nobody said: the default
    sources = args.configured.loaded.sources
    assert sources["router.admission.max_queued_runs"] == "flag --max-queued-runs"
    assert sources["router.admission.max_running_runs"] == "env TRELLIS_ROUTER__ADMISSION__MAX_RUNNING_RUNS"
    assert sources["router.admission.max_runs_per_client"] == f"file {config}"
    assert sources["router.limits.max_n"] == "default"


def test_older_environment_names_still_work_below_the_new_ones(monkeypatch):
    monkeypatch.setenv("TRELLIS_WORKERS", "127.0.0.1:7")
    assert router_args([]).worker_list == ["127.0.0.1:7"]
    monkeypatch.setenv("TRELLIS_ROUTER__DISCOVERY__WORKERS", "127.0.0.1:8")
    args = router_args([])
    assert args.worker_list == ["127.0.0.1:8"]
    assert args.configured.loaded.sources["router.discovery.workers"] == "env TRELLIS_ROUTER__DISCOVERY__WORKERS"
    monkeypatch.setenv("TRELLIS_CONFIG", str(EXAMPLE))     # the file, by environment
    assert router_args([]).configured.loaded.config == EXAMPLE


@pytest.mark.parametrize("where", ["flag", "env", "file"])
def test_a_bad_value_exits_2_naming_the_setting_and_its_source(where, tmp_path, monkeypatch, capsys):
    argv = ["--workers", "127.0.0.1:1"]
    if where == "flag":
        argv += ["--max-queued-runs", "-1"]
    elif where == "env":
        monkeypatch.setenv("TRELLIS_ROUTER__ADMISSION__MAX_QUEUED_RUNS", "-1")
    else:
        (tmp_path / "t.toml").write_text("[router.admission]\nmax_queued_runs = -1\n")
        argv += ["--config", str(tmp_path / "t.toml")]
    err = refused(argv, capsys)
    assert "router.admission.max_queued_runs: must be >= 0, got -1" in err
    assert {"flag": "--max-queued-runs", "env": "TRELLIS_ROUTER__ADMISSION__MAX_QUEUED_RUNS",
            "file": "t.toml"}[where] in err


def test_every_refusal_names_the_setting(tmp_path, monkeypatch, capsys):
    def with_file(text: str) -> str:
        (tmp_path / "t.toml").write_text(text)
        return refused(["--workers", "127.0.0.1:1", "--config", str(tmp_path / "t.toml")], capsys)

    assert "router.admission.max_queud_runs: unknown setting" in with_file("[router.admission]\nmax_queud_runs = 1\n")
    assert "did you mean 'max_queued_runs'?" in with_file("[router.admission]\nmax_queud_runs = 1\n")
    assert "did you mean 'admission'?" in with_file("[router.admision]\nmax_queued_runs = 1\n")
    assert "routr: not a Trellis process's table" in with_file("[routr.admission]\nmax_queued_runs = 1\n")
    assert "did you mean 'router'?" in with_file("[routr.admission]\nmax_queued_runs = 1\n")
    assert "router.routing.routing: must be one of 'kv', 'least_loaded' or 'round_robin', got 'fastest'" in \
        with_file('[router.routing]\nrouting = "fastest"\n')
    assert "router.limits.max_n: input should be a valid integer" in with_file('[router.limits]\nmax_n = "lots"\n')
    assert "router.admission: is a table of settings" in with_file("[router]\nadmission = 3\n")
    assert "is not valid TOML" in with_file("[router.admission\n")
    assert "cannot read" in refused(["--config", str(tmp_path / "missing.toml")], capsys)
    monkeypatch.setenv("TRELLIS_ROUTER__ADMISSION__MAX_QUEUED", "3")
    err = refused(["--workers", "127.0.0.1:1"], capsys)
    assert "TRELLIS_ROUTER__ADMISSION__MAX_QUEUED: not a setting of router" in err
    assert "did you mean 'TRELLIS_ROUTER__ADMISSION__MAX_QUEUED_RUNS'?" in err
    monkeypatch.delenv("TRELLIS_ROUTER__ADMISSION__MAX_QUEUED")
    assert "router.discovery.workers (--workers): give at least one" in refused([], capsys)
    (tmp_path / "auth.json").write_text("{not json")
    assert "router.auth.auth_file (--auth-file)" in refused(["--workers", "127.0.0.1:1", "--auth-file",
                                                             str(tmp_path / "auth.json")], capsys)


def test_print_config_shows_every_setting_with_its_source_and_loads_back(tmp_path, monkeypatch, capsys):
    config = tmp_path / "trellis.toml"
    config.write_text("[router.limits]\nmax_n = 12\n")
    monkeypatch.setenv("TRELLIS_ROUTER__ROUTING__OVERLAP_WEIGHT", "2.5")
    with pytest.raises(SystemExit) as info:
        router_args(["--config", str(config), "--workers", "127.0.0.1:1", "--print-config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert f"max_n = 12  # file {config}" in printed
    assert "overlap_weight = 2.5  # env TRELLIS_ROUTER__ROUTING__OVERLAP_WEIGHT" in printed
    assert 'workers = "127.0.0.1:1"  # flag --workers' in printed
    assert "max_queued_runs = 1024  # default" in printed
    assert "# auth_file = (unset)  # default" in printed
    again = tmp_path / "printed.toml"
    again.write_text(printed)          # what it printed is a config file that gives the same settings
    reloaded = load(RouterSettings, "router", config=again, env={})
    assert reloaded.settings == router_args(["--config", str(config), "--workers", "127.0.0.1:1"]).configured.settings


def test_secrets_are_masked_wherever_settings_are_shown():
    from trellis_settings import Section, setting
    from trellis_settings.layers import Loaded, flat

    class Upstream(Section):
        api_key: str = setting("", "the upstream's key", secret=True)
        url: str = setting("http://x", "the upstream")

    class Model(Section):
        upstream: Upstream = Upstream()

    loaded = load(Model, "worker_openai", env={"TRELLIS_WORKER_OPENAI__UPSTREAM__API_KEY": "sk-secret"})
    assert loaded.settings.upstream.api_key == "sk-secret"
    assert flat(loaded.settings)["upstream.api_key"] == "***"
    shown = render(Loaded(loaded.settings, "worker_openai", loaded.sources))
    assert "sk-secret" not in shown and '# api_key = "***"' in shown
    assert tomllib.loads(shown)["worker_openai"]["upstream"] == {"url": "http://x"}   # the mask never loads back


def test_the_example_file_loads_for_every_process_it_configures():
    tables = tomllib.loads(EXAMPLE.read_text())
    assert {"router", "gateway", "worker_cpu", "worker_openai"} <= set(tables)
    for process in tables:
        model = model_of(process)
        assert model is not None, f"{process}: no settings model"
        loaded = load(model, process, config=EXAMPLE, env={})
        assert any(source.startswith("file") for source in loaded.sources.values())


def test_the_reference_is_generated_from_the_models():
    assert rewritten(DOC.read_text()) == DOC.read_text(), "run: python -m trellis_settings.reference"
    text = DOC.read_text()
    for process in PROCESSES:
        model = model_of(process)
        if model is not None:
            assert f"### `{process}`" in text
    assert "TRELLIS_ROUTER__ADMISSION__MAX_QUEUED_RUNS" in text and "Reloadable" in text


@pytest.mark.processes
def test_bad_setting_at_start_is_refused_by_the_real_process(tmp_path):
    import subprocess
    import sys

    (tmp_path / "t.toml").write_text("[gateway.requests]\nmax_choice = 3\n")
    proc = subprocess.run([sys.executable, "-m", "gateway", "--config", str(tmp_path / "t.toml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "gateway.requests.max_choice: unknown setting" in proc.stderr
    assert "did you mean 'max_choices'?" in proc.stderr


# ---- reloads of a running router --------------------------------------------------------------------------

def hold_slot(address: str) -> threading.Thread:
    from trellis_client import Client, Started

    started = threading.Event()

    def run():
        with Client(address) as client:
            for event in client.stream("native_generation", "hi", sampling={"max_tokens": 200, "ignore_eos": True}):
                if isinstance(event, Started):
                    started.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30)
    return thread


def refused_now(address: str) -> bool:
    from trellis_client import Client, TrellisError

    with Client(address) as client:
        try:
            client.run("native_generation", "hi", sampling={"max_tokens": 1}, deadline=30)
            return False
        except TrellisError as err:
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED, err
            return True


def log_events(proc, event: str) -> list[dict]:
    return [line for line in (json.loads(x) for x in proc.log_path.read_text().splitlines() if x.startswith("{"))
            if line.get("event") == event]


def wait_for(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


@pytest.mark.processes
def test_running_router_reloads_admission_and_auth_and_keeps_old_settings_on_a_bad_file(tiny_worker, logs, tmp_path):
    import hashlib

    from trellis_client import Client, TrellisError

    config = tmp_path / "trellis.toml"
    auth = tmp_path / "auth.json"
    entry = {"name": "a", "token_sha256": hashlib.sha256(b"one").hexdigest()}
    auth.write_text(json.dumps({"allow_anonymous": True, "clients": [entry]}))
    config.write_text(f'[router.admission]\nmax_running_runs = 1\nmax_queued_runs = 0\n'
                      f'[router.auth]\nauth_file = "{auth}"\n')
    router = start_router([tiny_worker.address], logs, name="reload-router", extra=["--config", str(config)])
    try:
        router.wait_serving(timeout=60)
        (settings_line,) = log_events(router, "settings")
        assert settings_line["settings"]["admission.max_queued_runs"] == 0
        assert settings_line["overridden"]["router.admission.max_queued_runs"] == f"file {config}"

        holder = hold_slot(router.address)
        assert refused_now(router.address)            # one running, none may wait
        holder.join(60)

        # a file change: room for a waiting run now (picked up by the file watch, no signal)
        config.write_text(config.read_text().replace("max_queued_runs = 0", "max_queued_runs = 4"))
        assert wait_for(lambda: len(log_events(router, "settings reloaded")) == 1)
        reload_line = log_events(router, "settings reloaded")[0]
        assert reload_line["changed"] == {"admission.max_queued_runs": 4}
        holder = hold_slot(router.address)
        assert not refused_now(router.address)        # it waited its turn instead
        holder.join(60)

        # a bad file is refused and the old settings stay
        good = config.read_text()
        config.write_text(good.replace("max_queued_runs = 4", "max_queued_runs = -4"))
        router.popen.send_signal(signal.SIGHUP)
        assert wait_for(lambda: log_events(router, "settings reload refused; the old settings stay"))
        refusal = log_events(router, "settings reload refused; the old settings stay")[0]
        assert "router.admission.max_queued_runs: must be >= 0, got -4" in refusal["error"]
        holder = hold_slot(router.address)
        assert not refused_now(router.address)        # still 4 may wait
        holder.join(60)
        config.write_text(good)

        # the auth file is re-read when it changes: a new client's token works without a restart
        with Client(router.address, token="two") as client, pytest.raises(TrellisError) as err:
            client.controllers()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        second = {"name": "b", "token_sha256": hashlib.sha256(b"two").hexdigest()}
        auth.write_text(json.dumps({"allow_anonymous": True, "clients": [entry, second]}))
        with Client(router.address, token="two") as client:
            assert wait_for(lambda: _allowed(client))
        # and a broken auth file is refused like a bad config: the clients known stay known
        auth.write_text("{broken")
        assert wait_for(lambda: len(log_events(router, "settings reload refused; the old settings stay")) == 2)
        with Client(router.address, token="two") as client:
            assert client.controllers()
        assert router.popen.poll() is None
    finally:
        router.stop()


def _allowed(client) -> bool:
    from trellis_client import TrellisError

    try:
        client.controllers()
        return True
    except TrellisError:
        return False
