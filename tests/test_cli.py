"""The `climrecon` command line: help for every command, config display, and clear config errors."""

import yaml
from typer.testing import CliRunner

from climrecon.cli import app

runner = CliRunner()


def test_every_command_explains_itself():
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0
    commands = [
        "ingest",
        "regrid",
        "train",
        "downscale",
        "aggregate",
        "evaluate",
        "reconstruct",
        "demo",
        "server",
        "catalog",
        "config",
    ]
    for name in commands:
        assert name in top.output
    for args in (
        [c] for c in ("ingest", "regrid", "train", "downscale", "aggregate", "evaluate", "reconstruct")
    ):
        res = runner.invoke(app, [*args, "--help"])
        assert res.exit_code == 0, res.output
        assert "--config" in res.output and "--set" in res.output


def test_config_show_applies_overrides():
    res = runner.invoke(
        app, ["config", "show", "--set", "ingest.time_chunk=24", "--set", "storage.root=s3://bucket/x"]
    )
    assert res.exit_code == 0, res.output
    shown = yaml.safe_load(res.stdout)
    assert shown["ingest"]["time_chunk"] == 24 and shown["storage"]["root"] == "s3://bucket/x"


def test_bad_config_key_is_named_and_exits_2(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("regrid:\n  resolutoin: 0.5\n")
    res = runner.invoke(app, ["config", "show", "--config", str(f)])
    assert res.exit_code == 2
    assert "regrid.resolutoin: unknown key" in res.output and str(f) in res.output
