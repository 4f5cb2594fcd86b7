"""Config loading: typed objects, defaults documented, errors that name file, key, expected and found."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from kiosk.config import KioskConfig, load_config
from kiosk.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _keys(cls: type, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update(_keys(tp, f"{prefix}{f.name}."))
        elif f.default is not dataclasses.MISSING:
            out[prefix + f.name] = f.default
        else:
            out[prefix + f.name] = f.default_factory()  # type: ignore[misc]
    return out


def _flatten(data: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_shipped_config_documents_every_key_with_its_default():
    shipped = _flatten(yaml.safe_load((REPO / "config" / "kiosk.yaml").read_text()))
    defaults = _keys(KioskConfig)
    assert set(shipped) == set(defaults)
    # The one documented exception: it ships with one camera to edit (the default is none).
    assert defaults.pop("cameras") == [] and shipped["cameras"] == [
        {
            "id": "cam-a1",
            "gate": "A1",
            "source": 0,
            "realtime": True,
            "loop": False,
            "fps": None,
            "encoding": "bgr8",
            "key": None,
        }
    ]
    for key, default in defaults.items():
        if isinstance(default, Path):  # shipped paths point at the repo's var/ folder
            assert Path(str(shipped[key])).name == default.name, key
        elif key == "models.pad":  # the shipped texture models, named as written: [default]
            assert [str(v) for v in shipped[key]] == [str(v) for v in default] == ["default"], key
        else:
            assert shipped[key] == default, key
    cfg = load_config(REPO / "config" / "kiosk.yaml")
    assert cfg.resolve(cfg.gallery.path) == REPO / "var" / "gallery.db"


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "k.yaml"
    path.write_text("gallery: {path: data/g.db}\n")
    cfg = load_config(path)
    assert cfg.resolve(cfg.gallery.path) == tmp_path / "sub" / "data" / "g.db"


@pytest.mark.parametrize(
    "text, keypath, expected, found",
    [
        ("policy: {accept_treshold: 0.5}\n", "policy.accept_treshold", "one of the keys", "unknown key"),
        ("policy: {accept_frames: three}\n", "policy.accept_frames", "an integer", "'three'"),
        ("policy: {accept_threshold: 1.5}\n", "policy.accept_threshold", "from -1 to 1", "1.5"),
        ("security: {curve: 'no'}\n", "security.curve", "true or false", "'no'"),
        ("models: {providers: [cuda, gpu]}\n", "models.providers[1]", "one of auto, tensorrt", "'gpu'"),
        ("cameras: [{id: a, source: 0}]\n", "cameras[0].gate", "required", "no value"),
        ("cameras: {id: a}\n", "cameras", "a list", "a mapping"),
        ("bogus: 1\n", "bogus", "one of the keys", "unknown key"),
        ("cameras: [{id: a, gate: A, fps: -5}]\n", "cameras[0].fps", "above 0", "-5"),
        ("hooks: {python: [':f']}\n", "hooks.python[0]", "module:function", "':f'"),
        ("pad: {threshold: 0.2, attack_below: 0.4}\n", "pad.attack_below", "at most pad.threshold (0.2)", "0.4"),
        ("pad: {checks: texture}\n", "pad.checks", "a list", "'texture'"),
        ("console: {allowed_hosts: console.example.org}\n", "console.allowed_hosts", "a list", "'console.example.org'"),
        (
            "console: {allowed_hosts: ['https://console.example.org']}\n",
            "console.allowed_hosts[0]",
            "HOST or HOST:PORT",
            "'https://console.example.org'",
        ),
        ("console: {allowed_hosts: []}\n", "console.allowed_hosts", "at least one HOST", "a list"),
        ("console: {request_timeout_s: 0}\n", "console.request_timeout_s", "from 0.5 to 300", "0"),
        ("console: {request_timeout_s: soon}\n", "console.request_timeout_s", "a number", "'soon'"),
        (
            "cameras: [{id: a, gate: A1}]\nsecurity: {operators: [{key: r, gates: [A2]}]}\n",
            "security.operators[0].gates[0]",
            'a gate of cameras[] (A1) or "*"',
            "'A2'",
        ),
        ("security: {operators: [{key: ../r, gates: ['*']}]}\n", "security.operators[0].key", "a key name", "'../r'"),
        (
            "security: {operators: [{key: r, gates: [A1, '*']}]}\n",
            "security.operators[0].gates",
            '["*"] alone',
            "among other gates",
        ),
        (
            "security: {operators: [{key: r, gates: [A1]}, {key: r, gates: [B1]}]}\n",
            "security.operators[1].key",
            "a key listed once",
            "'r'",
        ),
        ("security: {operators: {r: [A1]}}\n", "security.operators", "a list", "a mapping"),
        (
            "subscribers: [{name: s, mqtt: 'tcp://broker:1883'}]\n",
            "subscribers[0].mqtt",
            "mqtt://[USER@]HOST[:PORT] or mqtts://",
            "scheme 'tcp'",
        ),
        ("subscribers: [{name: s, mqtt: 'mqtt://broker:port'}]\n", "subscribers[0].mqtt", "mqtt://", "a bad port"),
        (
            "subscribers: [{name: s, mqtt: 'mqtt://b'}, {name: t, gate: A1, mqtt: 'mqtt://b'}]\n",
            "subscribers[1].mqtt",
            "one MQTT subscriber per broker",
            "mqtt://b",
        ),
        ("hooks: {mqtt_prefix: 'site/#'}\n", "hooks.mqtt_prefix", "a topic prefix", "'site/#'"),
    ],
)
def test_errors_name_file_key_expected_and_found(tmp_path, text, keypath, expected, found):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert f": {keypath}: expected" in msg
    assert expected in msg and found in msg


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("policy:\n  accept_threshold: [0.4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line \d+"):
        load_config(path)


def test_missing_file_and_defaults(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    monkeypatch.delenv("KIOSK_CONFIG", raising=False)
    cfg = load_config(None)
    assert cfg.policy.accept_threshold == 0.40 and cfg.security.curve is True
    monkeypatch.setenv("KIOSK_CONFIG", str(tmp_path / "env.yaml"))
    (tmp_path / "env.yaml").write_text("policy: {accept_frames: 5, reject_after_frames: 9}\n")
    assert load_config(None).policy.accept_frames == 5


def test_camera_source_is_index_or_string(tmp_path):
    path = tmp_path / "k.yaml"
    path.write_text("cameras: [{id: a, gate: A1, source: 0}, {id: b, gate: A2, source: clips/x.mp4}]\n")
    cfg = load_config(path)
    assert cfg.cameras[0].source == 0 and cfg.cameras[1].source == "clips/x.mp4"
    path.write_text("cameras: [{id: a, gate: A1}, {id: a, gate: A2}]\n")
    with pytest.raises(ConfigError, match=r"cameras\[1\].id: expected a camera id used once"):
        load_config(path)


def test_a_wrong_operator_scope_stops_a_command_with_exit_2(tmp_path):
    from tests.conftest import run_cli

    path = tmp_path / "bad.yaml"
    path.write_text("cameras: [{id: a, gate: A1}]\nsecurity: {operators: [{key: reader-a1, gates: [A9]}]}\n")
    res = run_cli("kiosk", "status", "-c", str(path))
    assert res.returncode == 2 and "security.operators[0].gates[0]" in res.stderr and "'A9'" in res.stderr
    assert "Traceback" not in res.stderr
