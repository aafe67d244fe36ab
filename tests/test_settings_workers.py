"""The three workers on trellis_settings, through their real command lines (in process, no worker started):
--print-config prints TOML naming each value's source, a bad value exits 2 naming the setting, a --config file
sets values that flags override, a typo in the file gets a did-you-mean, every flag is a setting, the choices
written out in the settings models are the engines' own, and the older environment names still work."""

from __future__ import annotations

import importlib
import os
import tomllib
from dataclasses import dataclass
from typing import get_args

import pytest

from trellis_settings.fields import extra
from trellis_settings.layers import leaves, load
from trellis_settings.reference import model_of

# worker_openai has one required setting; the others start from nothing.
BASE = {"worker_cpu": [], "worker_gpu": [], "worker_openai": ["--base-url", "http://127.0.0.1:9/v1"]}


@dataclass(frozen=True)
class Case:
    process: str
    flag: tuple[str, str, str, object]      # flag, its text, the setting (section.key), the value it gets
    env: tuple[str, str, str, object]       # variable, its text, the setting, the value it gets
    bad: tuple[str, str, str]               # flag, a value out of bounds, what stderr says
    file: tuple[str, str, object, str, str, object]  # table, key, value in the file; the flag over it, its text,
                                                     # the value it gets
    typo: tuple[str, str]                   # a misspelt file line, and the did-you-mean


CASES = [
    Case("worker_cpu",
         flag=("--max-batch-size", "8", "engine.max_batch_size", 8),
         env=("TRELLIS_WORKER_CPU__ENGINE__THREADS", "3", "engine.threads", 3),
         bad=("--block-size", "0", "worker_cpu.engine.block_size: must be >= 1, got 0 (from flag --block-size)"),
         file=("scoring", "max_candidates", 5, "--max-candidates", "7", 7),
         typo=("[worker_cpu.engine]\nmax_batch_sise = 3\n", "did you mean 'max_batch_size'?")),
    Case("worker_gpu",
         flag=("--engine", "torch", "engine.engine", "torch"),
         env=("TRELLIS_WORKER_GPU__ENGINE__KV_CACHE_TOKENS", "4096", "engine.kv_cache_tokens", 4096),
         bad=("--kv-cache-free-gpu-memory-fraction", "1.5",
              "worker_gpu.engine.kv_cache_free_gpu_memory_fraction: must be <= 1.0, got 1.5"),
         file=("engine", "max_num_tokens", 1024, "--max-num-tokens", "2048", 2048),
         typo=("[worker_gpu.scoring]\nprm_token = \"+,-\"\n", "did you mean 'prm_tokens'?")),
    Case("worker_openai",
         flag=("--upstream-kind", "vllm", "upstream.upstream_kind", "vllm"),
         env=("TRELLIS_WORKER_OPENAI__UPSTREAM__REQUEST_RETRIES", "5", "upstream.request_retries", 5),
         bad=("--read-timeout", "0", "worker_openai.upstream.read_timeout: must be > 0.0, got 0.0"),
         file=("engine", "max_concurrency", 16, "--max-concurrency", "32", 32),
         typo=("[worker_openai.helth]\nhealth_interval = 1.0\n", "did you mean 'health'?")),
]
IDS = [c.process for c in CASES]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("TRELLIS_WORKER_CPU__", "TRELLIS_WORKER_GPU__", "TRELLIS_WORKER_OPENAI__")) or key in (
                "TRELLIS_CONFIG", "TRELLIS_METRICS_PORT", "TRELLIS_UPSTREAM_API_KEY", "OPENAI_API_KEY"):
            monkeypatch.delenv(key)


def parse(process: str, argv: list[str]):
    return importlib.import_module(f"{process}.cli").parse_args([*BASE[process], *argv])


def exits(process: str, argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        parse(process, argv)
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def value_at(settings, dotted: str):
    for part in dotted.split("."):
        settings = getattr(settings, part)
    return settings


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_print_config_is_toml_naming_flag_and_env_sources(case, tmp_path, monkeypatch, capsys):
    flag, text, setting, value = case.flag
    variable, env_text, env_setting, env_value = case.env
    monkeypatch.setenv(variable, env_text)
    code, out, _ = exits(case.process, [flag, text, "--print-config"], capsys)
    assert code == 0
    printed = tomllib.loads(out)[case.process]
    assert value_at_dict(printed, setting) == value and value_at_dict(printed, env_setting) == env_value
    key, env_key = setting.rpartition(".")[2], env_setting.rpartition(".")[2]
    assert f"  # flag {flag}" in next(line for line in out.splitlines() if line.startswith(f"{key} = "))
    assert f"{env_key} = {env_text}  # env {variable}" in out
    # what it printed loads back as a config file that gives the same settings
    (tmp_path / "printed.toml").write_text(out)
    again = load(model_of(case.process), case.process, config=tmp_path / "printed.toml", env={})
    assert again.settings == parse(case.process, [flag, text]).configured.settings


def value_at_dict(table: dict, dotted: str):
    for part in dotted.split("."):
        table = table[part]
    return table


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_bad_value_exits_2_naming_the_setting(case, capsys):
    flag, text, message = case.bad
    code, _, err = exits(case.process, [flag, text], capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_bad_environment_value_exits_2_naming_the_variable(case, monkeypatch, capsys):
    variable = case.env[0]
    monkeypatch.setenv(variable, "-7")
    code, _, err = exits(case.process, [], capsys)
    dotted = f"{case.process}.{case.env[2]}"
    assert code == 2 and f"{dotted}: must be >" in err and f"got -7 (from env {variable})" in err


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_the_config_file_sets_a_value_and_a_flag_overrides_it(case, tmp_path):
    section, key, value, flag, text, flagged = case.file
    config = tmp_path / "trellis.toml"
    config.write_text(f"[{case.process}.{section}]\n{key} = {value}\n"
                      "[router.admission]\nmax_queued_runs = 3\n")    # another process's table: not this one's
    args = parse(case.process, ["--config", str(config)])
    assert getattr(args, key) == value == getattr(getattr(args.configured.settings, section), key)
    assert args.configured.loaded.sources[f"{case.process}.{section}.{key}"] == f"file {config}"
    args = parse(case.process, ["--config", str(config), flag, text])
    assert getattr(args, key) == flagged
    assert args.configured.loaded.sources[f"{case.process}.{section}.{key}"] == f"flag {flag}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_an_unknown_key_in_the_file_exits_2_with_did_you_mean(case, tmp_path, capsys):
    text, suggestion = case.typo
    (tmp_path / "t.toml").write_text(text)
    code, _, err = exits(case.process, ["--config", str(tmp_path / "t.toml")], capsys)
    assert code == 2 and suggestion in err and f"{case.process}." in err


@pytest.mark.parametrize("process", IDS)
def test_every_flag_is_a_setting_and_the_namespace_holds_the_effective_settings(process):
    args = parse(process, [])
    model = model_of(process)
    flags = {extra(info)["flag"]: path for path, info in leaves(model).items() if extra(info).get("flag")}
    own = {"configured", "config", "print_config", "tls"}          # configure's and the CLI's own attributes
    assert set(vars(args)) - own == set(flags)
    settings = args.configured.settings
    for dest, path in flags.items():
        if (process, dest) in (("worker_openai", "health_url"), ("worker_openai", "reward_url")):
            continue                                                # derived from --base-url when unset
        assert getattr(args, dest) == value_at(settings, ".".join(path)), dest


@pytest.mark.parametrize("process", IDS)
def test_the_older_metrics_variable_still_works_below_the_new_one(process, monkeypatch):
    monkeypatch.setenv("TRELLIS_METRICS_PORT", "9464")
    args = parse(process, [])
    assert args.metrics_port == 9464
    assert args.configured.loaded.sources[f"{process}.telemetry.metrics_port"] == "env TRELLIS_METRICS_PORT"
    new = f"TRELLIS_{process.upper()}__TELEMETRY__METRICS_PORT"
    monkeypatch.setenv(new, "9465")
    assert parse(process, []).metrics_port == 9465
    assert parse(process, ["--metrics-port", "9466"]).metrics_port == 9466


def test_the_choices_written_in_the_models_are_the_engines_own():
    from torch_engine.cpu_dtype import DTYPES
    from torch_engine.model.compiled_decode import COMPILE_MODES
    from torch_engine.model.quant import QUANTIZE_CHOICES
    from torch_engine.scheduler import POLICIES
    from worker_cpu.settings import Engine as CpuEngine
    from worker_cpu.settings import Model as CpuModel
    from worker_gpu.cli import ENGINES
    from worker_gpu.settings import Engine as GpuEngine
    from worker_openai.sampling_fields import KINDS
    from worker_openai.settings import Upstream

    def choices(section, name: str) -> set:
        return set(get_args(section.model_fields[name].annotation))

    assert choices(CpuModel, "dtype") == set(DTYPES)
    assert choices(CpuModel, "quantize") == set(QUANTIZE_CHOICES)
    assert choices(CpuModel, "compile") == set(COMPILE_MODES)
    assert choices(CpuEngine, "scheduling") == set(POLICIES)
    assert choices(GpuEngine, "engine") == set(ENGINES)
    assert choices(Upstream, "upstream_kind") == set(KINDS)


def test_the_cli_keeps_refusing_what_it_refused(capsys):
    code, _, err = exits("worker_gpu", ["--prm-tokens", "+"], capsys)
    assert code == 2 and "worker_gpu.scoring.prm_tokens: value error, give two tokens" in err
    code, _, err = exits("worker_gpu", ["--max-context-tokens", "-1"], capsys)
    assert code == 2 and "--max-context-tokens" in err
    code, _, err = exits("worker_cpu", ["--dtype", "float16"], capsys)
    assert code == 2 and "invalid choice" in err
    code, _, err = exits("worker_openai", ["--max-concurrency", "0"], capsys)
    assert code == 2 and "worker_openai.engine.max_concurrency: must be >= 1" in err


def test_worker_gpu_prm_tokens_from_the_environment_are_checked_too(monkeypatch, capsys):
    monkeypatch.setenv("TRELLIS_WORKER_GPU__SCORING__PRM_TOKENS", "a,b,c")
    code, _, err = exits("worker_gpu", [], capsys)
    assert code == 2 and "worker_gpu.scoring.prm_tokens" in err and "TRELLIS_WORKER_GPU__SCORING__PRM_TOKENS" in err
    monkeypatch.setenv("TRELLIS_WORKER_GPU__SCORING__PRM_TOKENS", "+,-")
    assert parse("worker_gpu", []).prm_tokens == "+,-"


def test_worker_cpu_booleans_come_from_the_environment_and_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TRELLIS_WORKER_CPU__SCORING__NO_VERIFIER", "true")
    (tmp_path / "t.toml").write_text("[worker_cpu.model]\ntrust_remote_code = true\n")
    args = parse("worker_cpu", ["--config", str(tmp_path / "t.toml")])
    assert args.no_verifier is True and args.trust_remote_code is True
    assert parse("worker_cpu", []).trust_remote_code is False


def test_worker_openai_base_url_may_come_from_the_file_or_env_but_is_required(tmp_path, monkeypatch, capsys):
    from worker_openai.cli import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args([])
    assert info.value.code == 2 and "worker_openai.upstream.base_url (--base-url): required" in capsys.readouterr().err
    (tmp_path / "t.toml").write_text('[worker_openai.upstream]\nbase_url = "http://vllm:8000/v1"\n'
                                     'upstream_kind = "vllm"\n')
    args = parse_args(["--config", str(tmp_path / "t.toml")])
    assert args.base_url == "http://vllm:8000/v1" and args.health_url == "http://vllm:8000/health"
    monkeypatch.setenv("TRELLIS_WORKER_OPENAI__UPSTREAM__BASE_URL", "http://sglang:30000/v1")
    assert parse_args(["--config", str(tmp_path / "t.toml")]).base_url == "http://sglang:30000/v1"


def test_worker_openai_api_key_is_a_masked_setting_without_a_flag(tmp_path, monkeypatch, capsys):
    from worker_openai.cli import api_key

    assert api_key(parse("worker_openai", [])) == ""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    assert api_key(parse("worker_openai", [])) == "sk-openai"            # the generic name: the last resort
    monkeypatch.setenv("TRELLIS_UPSTREAM_API_KEY", "sk-older")
    args = parse("worker_openai", [])
    assert api_key(args) == "sk-older"
    assert args.configured.loaded.sources["worker_openai.upstream.api_key"] == "env TRELLIS_UPSTREAM_API_KEY"
    monkeypatch.setenv("TRELLIS_WORKER_OPENAI__UPSTREAM__API_KEY", "sk-new")
    assert api_key(parse("worker_openai", [])) == "sk-new"
    (tmp_path / "key").write_text("sk-file\n")
    assert api_key(parse("worker_openai", ["--api-key-file", str(tmp_path / "key")])) == "sk-file"
    code, out, _ = exits("worker_openai", ["--print-config"], capsys)
    assert code == 0 and "sk-" not in out
    assert 'api_key = "***"  # env TRELLIS_WORKER_OPENAI__UPSTREAM__API_KEY' in out
    from worker_openai.settings import Upstream

    assert extra(Upstream.model_fields["api_key"])["flag"] is None     # never on a command line
