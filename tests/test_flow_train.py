"""The Prefect ``train`` flow trains a tiny model on a tiny synthetic store and writes its outputs."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image
from test_training_data import tiny_train_config, write_tiny_stores

from climrecon.config import ConfigError, load_config
from climrecon.flows.train import train_flow
from climrecon.models.checkpoint import load_networks, read_checkpoint


def _config(tmp_path, truth: str, static: str) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(tiny_train_config(truth, static, tmp_path / "out" / "tiny.pt")))
    return str(path)


def test_train_flow_writes_checkpoint_inference_copy_and_loss_plot(tmp_path, prefect_harness):
    truth, static = write_tiny_stores(tmp_path)
    config = _config(tmp_path, truth, static)
    path = train_flow(config_path=config, overrides=["train.seed=1"])
    assert path == str(tmp_path / "out" / "tiny.pt")
    contents = read_checkpoint(path)
    assert contents.header["training"]["step"] == 4 and len(contents.tensors["train.losses"]) == 4
    assert np.isfinite(contents.tensors["train.losses"].numpy()).all()
    _, meta = load_networks(
        tmp_path / "out" / "tiny.ema.pt",
        expect={"variables": ["tas", "uas", "vas"], "grid.coarsening_factor": 4},
    )
    assert (
        meta.method == "dpdm-residual" and meta.data["target"] == "residual" and meta.roles == ("denoiser",)
    )
    assert meta.method_config["name"] == "dpdm" and meta.method_config["patch_size"] == 16
    assert meta.step == 4 and meta.train["seed"] == 1
    # residual targets have ~zero mean; the coarse conditioning keeps full-field statistics (tas ~ 280 K)
    assert abs(meta.normalization.mean[0]) < 1.0 and meta.data["conditioning_normalization"]["mean"][0] > 250
    assert meta.cond_channels[:4] == ("tas_coarse", "uas_coarse", "vas_coarse", "orog")
    assert meta.data["train_years"] == [2000, 2000] and meta.data["heldout_years"] == [2002, 2002]
    assert meta.data["synthetic"] is True and meta.normalization.variables == ("tas", "uas", "vas")
    assert not any(k.startswith("train.") for k in read_checkpoint(tmp_path / "out" / "tiny.ema.pt").tensors)
    with Image.open(tmp_path / "out" / "tiny.loss.png") as png:
        assert png.size == (640, 400)
    # a finished run resumes as a no-op and returns the same checkpoint
    assert train_flow(config_path=config, overrides=["train.seed=1"]) == path
    assert read_checkpoint(path).header["content_sha256"] == contents.header["content_sha256"]


def test_train_config_rejects_heldout_overlap_and_bad_years(tmp_path):
    with pytest.raises(ConfigError, match="train.*overlaps heldout_years"):
        load_config(None, ["train.train_years=[1961, 2012]"])
    with pytest.raises(
        ConfigError, match=r"method.patch_size \(36\) must be a multiple of train.factor \(8\)"
    ):
        load_config(None, ["method.patch_size=36"])
    with pytest.raises(ConfigError, match="train.patch_size: moved to method.patch_size"):
        load_config(None, ["train.patch_size=32"])
