"""Config loading: defaults, YAML files, overrides, and errors that name the bad key."""

import json

import pytest

from climrecon.config import ConfigError, load_config
from climrecon.storage import redact, resolve_storage_options


def test_embedded_defaults_validate():
    cfg = load_config()
    assert cfg.ingest.time_chunk == 12
    assert cfg.sample.synthetic.region.lat_min < cfg.sample.synthetic.region.lat_max


def test_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ingest:\n  time_chunk: 6\n  query:\n    source_id: UM\n")
    cfg = load_config(f, ["ingest.time_chunk=24", "sample.synthetic.seed=7"])
    assert cfg.ingest.time_chunk == 24
    assert cfg.ingest.query.source_id == "UM"
    assert cfg.ingest.query.variable_id is None, "a query in a file replaces the default query whole"
    assert cfg.ingest.lon_convention == "-180..180", "other keys of a section keep their defaults"
    assert cfg.sample.synthetic.seed == 7


@pytest.mark.parametrize(
    ("text", "overrides", "expected"),
    [
        ("ingest:\n  time_chunks: 6\n", [], r"ingest\.time_chunks: unknown key"),
        ("ingest:\n  time_chunk: zero\n", [], r"ingest\.time_chunk: Input should be a valid integer"),
        (
            "",
            ["sample.synthetic.region.lat_min=60"],
            r"sample\.synthetic\.region: .*lat_min \(60\.0\) must be below",
        ),
        ("", ["ingest.lon_convention=east"], r"ingest\.lon_convention"),
        ("- a\n- b\n", [], "must hold a mapping"),
        ("ingest: [unclosed\n", [], "not valid YAML"),
        ("", ["ingest.time_chunk"], "not of the form dotted.key=value"),
    ],
)
def test_errors_name_the_key(tmp_path, text, overrides, expected):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(f, overrides)
    if "YAML" not in expected and "dotted" not in expected and "mapping" not in expected:
        assert str(f) in str(info.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_secrets_refused_in_config_and_redacted(monkeypatch):
    with pytest.raises(ConfigError, match=r"storage\.options: .*secret storage option\(s\) \['secret'\]"):
        load_config(None, ["storage.options.secret=abc"])
    monkeypatch.setenv("CLIMRECON_STORAGE_OPTIONS", json.dumps({"key": "AKIA-SECRET", "secret": "s3cr3t"}))
    opts = resolve_storage_options({"endpoint_url": "http://127.0.0.1:1"})
    assert opts["secret"] == "s3cr3t" and opts["endpoint_url"] == "http://127.0.0.1:1"
    shown = json.dumps(redact({"storage": opts, "nested": [{"token": "t0k"}]}))
    assert "s3cr3t" not in shown and "AKIA-SECRET" not in shown and "t0k" not in shown
    assert "http://127.0.0.1:1" in shown
