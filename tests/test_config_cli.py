"""Settings come from defaults < TOML file < TASKSERVER_* env < CLI flags; errors name the key.

The CLI tests run the real ``python -m taskserver`` in a subprocess.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from taskserver import ConfigError, Settings, TaskServer, load_settings

from .conftest import ROOT, ServerFactory, noop_finish, noop_task

DEFAULTS = Settings()


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "taskserver.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m taskserver ...`` in ``tmp_path`` (no config file there)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSERVER_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "taskserver", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
    )


# --- load_settings ---------------------------------------------------------------


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    config = _toml(
        tmp_path,
        'port = 1111\ntask_workers = 3\nheartbeat = 5.0\nlog_level = "DEBUG"\n',
    )
    env = {
        "TASKSERVER_TASK_WORKERS": "5",
        "TASKSERVER_HEARTBEAT": "6",
        "UNRELATED": "ignored",
    }
    settings = load_settings(
        config_file=config, env=env, overrides={"heartbeat": "7.5", "port": None}
    )
    assert settings.port == 1111  # file beats default; a None flag means "not given"
    assert settings.log_level == "DEBUG"  # file only
    assert settings.task_workers == 5  # env beats file
    assert settings.heartbeat == 7.5  # flag beats env and file
    assert settings.grace_period == DEFAULTS.grace_period  # nobody set it
    assert settings.db == DEFAULTS.db


def test_config_file_named_by_env(tmp_path: Path) -> None:
    config = _toml(tmp_path, "max_queued = 42\n")
    settings = load_settings(env={"TASKSERVER_CONFIG": str(config)})
    assert settings.max_queued == 42


def test_default_config_file_is_read_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "taskserver.toml").write_text("ready_window = 77\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings(env={}).ready_window == 77


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(config_file=tmp_path / "nope.toml", env={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 'blue'\n", "colour"),
        ("port = 'eighty'\n", "port"),
        ("port = 70000\n", "port"),
        ("task_workers = 2.5\n", "task_workers"),
        ("task_workers = true\n", "task_workers"),
        ("synchronous = 'SOMETIMES'\n", "synchronous"),
        ("app = 'no-colon'\n", "app"),
        ("heartbeat = 0.0\n", "heartbeat"),
    ],
)
def test_bad_file_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    config = _toml(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=config, env={})
    assert key in str(caught.value)
    assert str(config) in str(caught.value)


def test_invalid_toml_is_an_error(tmp_path: Path) -> None:
    config = _toml(tmp_path, "port = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config_file=config, env={})


@pytest.mark.parametrize(
    ("var", "value", "key"),
    [
        ("TASKSERVER_COLOUR", "blue", "TASKSERVER_COLOUR"),
        ("TASKSERVER_PORT", "eighty", "port"),
        ("TASKSERVER_GRACE_PERIOD", "-1", "grace_period"),
        ("TASKSERVER_LOG_LEVEL", "LOUD", "log_level"),
        ("TASKSERVER_MAX_QUEUED", "0", "max_queued"),
    ],
)
def test_bad_env_values_name_the_key(tmp_path: Path, var: str, value: str, key: str) -> None:
    config = _toml(tmp_path, "")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=config, env={var: value})
    assert key in str(caught.value)
    assert var in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [("nonsense", "1"), ("port", "x"), ("task_workers", "-1"), ("default_max_attempts", "0")],
)
def test_bad_flags_name_the_key(tmp_path: Path, name: str, value: str) -> None:
    config = _toml(tmp_path, "")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_file=config, env={}, overrides={name: value})
    assert name in str(caught.value)


# --- mandatory callbacks -----------------------------------------------------------


async def test_start_without_task_callback_raises(settings: Settings) -> None:
    server = TaskServer(settings)
    server.on("finish", noop_finish)
    with pytest.raises(ConfigError, match="'task'"):
        await server.start()


async def test_start_without_finish_callback_raises(settings: Settings) -> None:
    server = TaskServer(settings)
    server.on("task", noop_task)
    with pytest.raises(ConfigError, match="'finish'"):
        await server.start()


async def test_no_workers_needs_no_callbacks(make_server: ServerFactory) -> None:
    server = await make_server(task=None, finish=None, task_workers=0)
    task_id = await server.task({"n": 1})
    assert (await server.get(task_id)).state == "queued"


async def test_second_registration_replaces_the_first(settings: Settings) -> None:
    async def first(ctx: object) -> str:
        return "first"

    async def second(ctx: object) -> str:
        return "second"

    server = TaskServer(settings)
    server.on("task", first)
    server.on("task", second)
    server.on("finish", noop_finish)
    await server.start()
    try:
        task = await server.wait_terminal(await server.task(None), timeout=10)
    finally:
        await server.stop()
    assert task.result == "second"


# --- the command line ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("app", "missing"),
    [
        ("tests.helpers:setup_missing_finish", "'finish'"),
        ("tests.helpers:setup_missing_task", "'task'"),
        ("tests.no_such_module:setup", "no_such_module"),
        ("tests.helpers:no_such_setup", "no_such_setup"),
    ],
)
def test_cli_refuses_a_bad_app_before_binding(tmp_path: Path, app: str, missing: str) -> None:
    db = tmp_path / "cli.db"
    done = _cli(tmp_path, "run", "--app", app, "--port", "0", "--db", str(db))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert missing in lines[0]
    assert "listening on" not in done.stdout + done.stderr
    assert not db.exists()  # nothing was opened


def test_cli_bad_flag_value_exits_2_with_one_line(tmp_path: Path) -> None:
    done = _cli(tmp_path, "run", "--port", "eighty", "--db", str(tmp_path / "x.db"))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "port" in lines[0]
    assert not (tmp_path / "x.db").exists()


def test_cli_unknown_flag_exits_2_with_one_line(tmp_path: Path) -> None:
    done = _cli(tmp_path, "run", "--colour", "blue")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--colour" in lines[0]


def test_cli_bad_env_value_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKSERVER_")}
    env.update(PYTHONPATH=str(ROOT), TASKSERVER_TASK_WORKERS="many")
    done = subprocess.run(
        [sys.executable, "-m", "taskserver", "run"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "task_workers" in lines[0]


def test_run_help_lists_every_setting(tmp_path: Path) -> None:
    done = _cli(tmp_path, "run", "--help")
    assert done.returncode == 0, done.stderr
    for field in dataclasses.fields(Settings):
        if field.metadata["file_only"]:  # a table: named in the help of --config
            assert field.name in done.stdout, field.name
            continue
        assert f"--{field.name.replace('_', '-')}" in done.stdout, field.name
    assert "--config" in done.stdout
