"""The `kunserve` command: build a tiny model, then generate from it; its flags (vLLM's spellings,
choices and defaults shown, cluster flags defined once); user errors as one line that says what to do."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

import pytest

import kunserve
from kunserve import cli
from kunserve.arch.spec import ModelSpec
from kunserve.cli import build_parser, main, serve_model
from kunserve.cluster.cluster import Cluster
from kunserve.cluster.config import CoordinatorConfig
from kunserve.cluster_args import coordinator_config
from kunserve.config import EngineConfig, GiB
from kunserve.engine_args import engine_config

# What kunserve/cluster_args.py defines, once for serve, bench and simulate.
CLUSTER_DESTS = ("replicas", "dispatch_policy", "overload_policy", "max_group_size", "drop_after_s",
                 "restore_after_s", "min_drop_gain", "check_interval_s", "overlap_exchange")


def test_make_tiny_model_writes_a_loadable_directory(tmp_path: Path) -> None:
    main(["make-tiny-model", str(tmp_path / "m"), "--arch", "qwen2"])
    spec = ModelSpec.from_dir(tmp_path / "m")
    assert spec.family == "qwen2" and (tmp_path / "m" / "tokenizer.json").is_file()


def test_generate_prints_completions_and_throughput(
    llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["generate", "--model", str(llama_dir), "--prompt", "Hi", "--max-tokens", "4", "--max-model-len", "64"])
    out = capsys.readouterr().out
    assert "'Hi' ->" in out and "1 requests, 4 tokens" in out


# ---- the flags: vLLM's spellings, choices and defaults in every --help ----------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"kunserve {kunserve.__version__}"


@pytest.mark.parametrize("argv, level", [(["generate"], "INFO"), (["--log-level", "debug", "generate"], "DEBUG"),
                                         (["generate", "--log-level", "warning"], "WARNING"),
                                         (["--log-level", "debug", "serve", "--log-level", "error"], "ERROR")])
def test_the_log_level_is_taken_before_or_after_the_command(argv: list[str], level: str) -> None:
    assert build_parser().parse_args(argv).log_level == level


@pytest.mark.parametrize("command", ["make-tiny-model", "generate", "serve", "bench", "simulate"])
def test_every_option_of_every_command_shows_its_default(command: str) -> None:
    parser = subcommands()[command]
    formatter = parser._get_formatter()
    missing = [
        action.option_strings[0]
        for action in parser._actions
        if action.option_strings and action.default is not argparse.SUPPRESS
        and "default" not in formatter._get_help_string(action)
    ]
    assert missing == []


@pytest.mark.parametrize("flag", ["--preemption-mode", "--attention-backend", "--linear-backend", "--load-format",
                                  "--async-scheduling", "--dtype", "--overload-policy", "--dispatch-policy"])
def test_enumerated_settings_list_their_choices(flag: str) -> None:
    action = next(a for a in subcommands()["serve"]._actions if flag in a.option_strings)
    assert action.choices


def test_sizes_are_given_in_gib_as_vllm_does() -> None:
    config = engine_config(parse("serve", "--swap-space", "2", "--memory-budget", "0.5", "--cpu-kv-cache-space", "3"))
    assert (config.swap_space_bytes, config.memory_budget_bytes, config.cpu_kv_cache_bytes) == (
        2 * GiB, GiB // 2, 3 * GiB)


def test_size_defaults_are_the_engine_defaults() -> None:
    config = engine_config(parse("serve"))
    assert (config.swap_space_bytes, config.memory_budget_bytes, config.cpu_kv_cache_bytes) == (
        EngineConfig.swap_space_bytes, EngineConfig.memory_budget_bytes, EngineConfig.cpu_kv_cache_bytes)


def test_a_negative_size_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse("serve", "--swap-space", "-1")


def test_serve_takes_the_model_as_vllm_does(tmp_path: Path) -> None:
    assert serve_model(parse("serve", "--model", "tiny-qwen2")) == "tiny-qwen2"
    assert serve_model(parse("serve", "tiny-qwen2")) == "tiny-qwen2"
    assert serve_model(parse("serve")) is None


def test_serve_refuses_two_different_models() -> None:
    with pytest.raises(ValueError, match="given twice"):
        serve_model(parse("serve", "tiny-qwen2", "--model", "tiny-llama"))


@pytest.mark.parametrize("flag", ["--replicas", "--data-parallel-size", "-dp"])
def test_data_parallel_size_is_the_replica_count(flag: str) -> None:
    assert parse("serve", flag, "3").replicas == 3


@pytest.mark.parametrize("flag", ["--pipeline-parallel-size", "-pp", "--pipeline-size"])
def test_pipeline_parallel_size_has_vllm_short_flag(flag: str) -> None:
    assert parse("serve", flag, "2").pipeline_parallel_size == 2


def test_serve_bench_and_simulate_share_the_cluster_flags() -> None:
    def cluster_flags(command: str) -> dict[str, object]:
        return {a.dest: (a.option_strings, a.choices, a.help) for a in subcommands()[command]._actions
                if a.dest in CLUSTER_DESTS}

    assert cluster_flags("serve") == cluster_flags("bench") == cluster_flags("simulate")
    assert len(cluster_flags("serve")) == len(CLUSTER_DESTS)


@pytest.mark.parametrize("command", ["serve", "bench", "simulate"])
def test_the_overlapped_exchange_is_off_unless_asked_for(command: str) -> None:
    assert not coordinator_config(parse(command)).overlap_exchange
    assert coordinator_config(parse(command, "--overlap-exchange")).overlap_exchange


@pytest.mark.parametrize("command", ["serve", "bench", "simulate"])
def test_the_drops_throughput_floor_is_the_coordinators_default_unless_given(command: str) -> None:
    assert coordinator_config(parse(command)).min_drop_gain == CoordinatorConfig().min_drop_gain
    assert coordinator_config(parse(command, "--min-drop-gain", "1.1")).min_drop_gain == 1.1


def test_serve_defaults_to_one_replica_and_comparisons_to_two() -> None:
    assert parse("serve").replicas == 1
    assert parse("bench").replicas == parse("simulate").replicas == 2


# ---- errors a user makes: one line saying what to do ----------------------------------------


def test_a_missing_model_directory_is_one_line_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["generate", "--model", "/no/such/model"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "no such directory" in err and "Traceback" not in err


def test_a_hub_id_says_only_local_directories_load(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--model", "meta-llama/Meta-Llama-3-8B"])
    err = capsys.readouterr().err
    assert "local directories only" in err and "hf download meta-llama/Meta-Llama-3-8B" in err


def test_ctrl_c_exits_130_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "make_tiny_model", interrupted)
    with pytest.raises(SystemExit) as exited:
        main(["make-tiny-model", str(tmp_path / "m")])
    assert exited.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_a_port_in_use_is_refused_before_the_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_load(*_: object, **__: object) -> None:
        raise AssertionError("the model loaded before the port was checked")

    monkeypatch.setattr(Cluster, "launch", must_not_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exited:
            main(["serve", "--host", "127.0.0.1", "--port", str(port)])
    assert exited.value.code == 2
