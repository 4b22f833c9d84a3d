"""Checkpoints (round trip, integrity, clear errors) and the normalisation statistics they carry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from climrecon.models.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    GridSpec,
    NetworkSpec,
    _content_hash,
    load_networks,
    read_checkpoint,
    save_checkpoint,
    strip_training_state,
)
from climrecon.models.edm import EDMConfig, EDMPrecond
from climrecon.models.normalization import PR_SCALE, NormalizationStats
from climrecon.models.unet import UNet, UNetConfig


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


VARIABLES = ("tas", "pr")


def make_model() -> EDMPrecond:
    torch.manual_seed(0)
    cfg = UNetConfig(
        out_channels=2,
        cond_channels=3,
        base_channels=8,
        channel_mults=(1, 2),
        num_blocks=1,
        attention_levels=(1,),
    )
    model = EDMPrecond(UNet(cfg), EDMConfig(sigma_data=1.0))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return model


def make_metadata(model: EDMPrecond) -> CheckpointMetadata:
    norm = NormalizationStats(VARIABLES, mean=(285.0, 0.8), std=(9.0, 0.6))
    return CheckpointMetadata(
        method="dpdm",
        networks={"denoiser": NetworkSpec.of(model)},
        variables=VARIABLES,
        cond_channels=("tas_coarse", "orog", "sftlf"),
        normalization=norm,
        grid=GridSpec(
            fine_resolution=0.25,
            coarsening_factor=8,
            patch_size=64,
            region={"lat_min": 30.0, "lat_max": 50.0, "lon_min": -125.0, "lon_max": -100.0},
        ),
        train={"lr": 2e-4},
        data={"source": "synthetic reanalysis (labelled stand-in for ERA5)", "years": [1961, 2000]},
        step=123,
    )


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, EDMPrecond, CheckpointMetadata]:
    model = make_model()
    meta = make_metadata(model)
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"denoiser": model.state_dict()}, meta)
    return path, model, meta


def test_round_trip_gives_same_outputs_and_metadata(saved):
    path, model, meta = saved
    networks, meta2 = load_networks(
        path, expect={"variables": ["tas", "pr"], "method": "dpdm", "grid.patch_size": 64}
    )
    loaded = networks["denoiser"]
    assert meta2 == meta
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    g = torch.Generator().manual_seed(0)
    x, cond, toy = (
        torch.randn(2, 2, 8, 8, generator=g),
        torch.randn(2, 3, 8, 8, generator=g),
        torch.rand(2, generator=g),
    )
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.5, cond, toy), model.eval()(x, 0.5, cond, toy))
    assert list(path.parent.iterdir()) == [path]  # atomic write left no temp file behind


def test_file_holds_only_tensors_and_one_json_string(saved):
    path, _, _ = saved
    blob = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for k, v in blob.items() if k != "metadata")
    header = json.loads(blob["metadata"])
    assert header["format"] == "climrecon-checkpoint" and len(header["content_sha256"]) == 64
    assert header["metadata"]["normalization"]["transforms"] == ["identity", "log1p"]


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"checkpoint .*nope\.pt does not exist"):
        load_networks(tmp_path / "nope.pt")


def test_not_a_climrecon_checkpoint(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save(make_model().state_dict(), plain)
    with pytest.raises(CheckpointError, match="is not a climrecon checkpoint"):
        load_networks(plain)
    pickled = tmp_path / "pickled.pt"
    torch.save({"metadata": "{}", "obj": Path("/etc")}, pickled)  # an arbitrary object: never unpickled
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_networks(pickled)


def test_corrupt_and_truncated_files(saved, tmp_path):
    path, _, _ = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_networks(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_networks(garbage)


def test_hash_mismatch_on_modified_weights_or_metadata(saved, tmp_path):
    path, _, _ = saved
    blob = torch.load(path, weights_only=True)
    name = next(k for k in blob if k.startswith("ema.") and blob[k].is_floating_point())
    blob[name] = blob[name] + 1e-3
    tampered = tmp_path / "tampered.pt"
    torch.save(blob, tampered)
    with pytest.raises(CheckpointError, match="failed its integrity check"):
        load_networks(tampered)
    blob = torch.load(path, weights_only=True)
    header = json.loads(blob["metadata"])
    header["metadata"]["variables"] = ["pr", "tas"]
    blob["metadata"] = json.dumps(header)
    torch.save(blob, tampered)
    with pytest.raises(CheckpointError, match="failed its integrity check"):
        load_networks(tampered)


def test_metadata_mismatch_with_expectations(saved):
    path, _, _ = saved
    with pytest.raises(
        CheckpointError, match=r"was trained for variables \['tas', 'pr'\] but \['tas'\] were requested"
    ):
        load_networks(path, expect={"variables": ["tas"]})
    with pytest.raises(CheckpointError, match=r"grid patch_size 64 but 128 was requested"):
        load_networks(path, expect={"grid.patch_size": 128})
    with pytest.raises(CheckpointError, match=r"no such metadata field"):
        load_networks(path, expect={"resolution": 0.25})


def test_strip_training_state_keeps_weights_and_metadata(saved, tmp_path):
    path, model, meta = saved
    train_path = tmp_path / "train.pt"
    save_checkpoint(
        train_path,
        {"denoiser": model.state_dict()},
        meta,
        training_state={"losses": torch.ones(3)},
        training_info={"step": 3},
    )
    assert "train.losses" in read_checkpoint(train_path).tensors
    slim = tmp_path / "slim.pt"
    strip_training_state(train_path, slim)
    contents = read_checkpoint(slim)
    assert not any(k.startswith("train.") for k in contents.tensors) and contents.header["training"] is None
    assert contents.metadata == meta
    assert contents.header["content_sha256"] == read_checkpoint(path).header["content_sha256"]


def test_metadata_needs_named_networks_and_weights_for_each():
    model = make_model()
    with pytest.raises(ValueError, match="at least one named network"):
        CheckpointMetadata(method="dpdm", networks={}, variables=("tas",))
    with pytest.raises(
        CheckpointError, match=r"weights given for roles \['denoiser'\] but the metadata describes"
    ):
        save_checkpoint(
            "unused.pt",
            {"denoiser": model.state_dict()},
            CheckpointMetadata(
                "corrdiff", {"denoiser": NetworkSpec.of(model), "regression": NetworkSpec.of(model)}
            ),
        )


def test_two_named_networks_round_trip_and_a_missing_role_is_named(tmp_path):
    first, second = make_model(), make_model()
    with torch.no_grad():
        for p in second.parameters():
            p.add_(0.01)
    meta = CheckpointMetadata(
        "two-stage",
        {"regression": NetworkSpec.of(first), "denoiser": NetworkSpec.of(second)},
        method_config={"name": "two-stage", "lr": 1},
    )
    path = tmp_path / "two.pt"
    save_checkpoint(path, {"regression": first.state_dict(), "denoiser": second.state_dict()}, meta)
    nets, meta2 = load_networks(path)
    assert set(nets) == {"regression", "denoiser"} and meta2.method_config == {"name": "two-stage", "lr": 1}
    x, cond, toy = torch.randn(1, 2, 8, 8), torch.randn(1, 3, 8, 8), torch.rand(1)
    with torch.no_grad():
        assert torch.equal(nets["regression"](x, 0.5, cond, toy), first.eval()(x, 0.5, cond, toy))
        assert torch.equal(nets["denoiser"](x, 0.5, cond, toy), second.eval()(x, 0.5, cond, toy))
    only = tmp_path / "only.pt"
    save_checkpoint(
        only,
        {"denoiser": second.state_dict()},
        CheckpointMetadata("two-stage", {"denoiser": NetworkSpec.of(second)}),
    )
    with pytest.raises(
        CheckpointError, match=r"lacks the network role\(s\) \['regression'\].*holds \['denoiser'\]"
    ):
        load_networks(only, roles=("regression", "denoiser"))


def test_format_1_files_are_read_as_format_2(saved, tmp_path):
    """A format-1 file (one network under ``ema.``, as the first shipped checkpoint) is verified with its own
    hash and loads as the ``denoiser`` role with identical outputs."""
    path, model, meta = saved
    v2 = read_checkpoint(path)
    header = json.loads(torch.load(path, weights_only=True)["metadata"])
    v1_meta = dict(header["metadata"])
    network = v1_meta.pop("networks")["denoiser"]
    v1_meta.pop("method_config")
    v1_meta.update(unet=network["unet"], edm=network["edm"])
    v1_header = {"format": "climrecon-checkpoint", "format_version": 1, "metadata": v1_meta, "training": None}
    tensors = {"ema." + k: v for k, v in v2.with_prefix("ema.denoiser.").items()}
    v1_header["content_sha256"] = _content_hash(v1_header, tensors)
    old = tmp_path / "v1.pt"
    torch.save({"metadata": json.dumps(v1_header), **tensors}, old)
    contents = read_checkpoint(old)
    assert contents.header["format_version"] == 2 and contents.header["upgraded_from_format"] == 1
    assert contents.header["content_sha256"] == v1_header["content_sha256"]  # the file's own identity
    assert contents.metadata == meta
    nets, _ = load_networks(old)
    x, cond, toy = torch.randn(1, 2, 8, 8), torch.randn(1, 3, 8, 8), torch.rand(1)
    with torch.no_grad():
        assert torch.equal(nets["denoiser"](x, 0.5, cond, toy), model.eval()(x, 0.5, cond, toy))
    tensors["ema.net.extra"] = torch.zeros(1)  # tampering is still caught under format 1
    torch.save({"metadata": json.dumps(v1_header), **tensors}, old)
    with pytest.raises(CheckpointError, match="failed its integrity check"):
        read_checkpoint(old)


# -- normalisation ---------------------------------------------------------------------------------
def physical_fields(seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tas = 285 + 10 * rng.standard_normal((5, 1, 6, 7))
    pr = rng.gamma(0.7, 3.0, (5, 1, 6, 7)) * PR_SCALE  # mm/day -> kg m-2 s-1
    pr[0, 0, 0, :3] = 0.0  # dry cells
    return np.concatenate([tas, pr], axis=1)


def test_normalisation_inverse_is_exact_numpy_and_torch():
    x = physical_fields()
    stats = NormalizationStats.fit({"tas": x[:, 0], "pr": x[:, 1]})
    assert stats.transforms == ("identity", "log1p") and stats.scales == (1.0, PR_SCALE)
    z = stats.normalize(x)
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, rtol=1e-12)
    np.testing.assert_allclose(stats.denormalize(z), x, rtol=1e-13, atol=0)
    xt = torch.from_numpy(x)
    back = stats.denormalize(stats.normalize(xt))
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float64
    torch.testing.assert_close(back, xt, rtol=1e-13, atol=0)
    assert (back[0, 1, 0, :3] == 0).all()


def test_normalisation_pr_transform_and_clipping():
    stats = NormalizationStats(("pr",), mean=(0.0,), std=(1.0,))
    one_mm_day = np.full((1, 1, 1), PR_SCALE)
    np.testing.assert_allclose(stats.normalize(one_mm_day), np.log(2))
    np.testing.assert_array_equal(stats.normalize(np.full((1, 1, 1), -1e-7)), 0.0)  # negative pr -> dry
    np.testing.assert_array_equal(stats.denormalize(np.full((1, 1, 1), -3.0)), 0.0)  # never negative pr
    # a diverged network's 1e3 (expm1 overflows float32 above ~88) stays finite, numpy and torch alike
    huge = stats.denormalize(np.full((1, 1, 1), 1e3)).astype(np.float32)
    assert np.isfinite(huge).all() and huge.item() > 1e12 * PR_SCALE
    assert torch.isfinite(stats.denormalize(torch.full((1, 1, 1), 1e3)).float()).all()


def test_normalisation_json_round_trip_and_errors():
    stats = NormalizationStats.fit({"tas": physical_fields()[:, 0], "pr": physical_fields()[:, 1]})
    assert NormalizationStats.from_json(stats.to_json()) == stats
    assert stats.subset(["pr"]).variables == ("pr",) and stats.subset(["pr"]).mean == (stats.mean[1],)
    with pytest.raises(ValueError, match="2 variables"):
        stats.normalize(np.zeros((1, 3, 4, 4)))
    with pytest.raises(ValueError, match="'tas': mean=1.0 and std=0.0"):
        NormalizationStats(("tas",), (1.0,), (0.0,))
    with pytest.raises(ValueError, match="unknown transform"):
        NormalizationStats(("tas",), (1.0,), (1.0,), ("sqrt",))
    with pytest.raises(KeyError, match="psl"):
        stats.subset(["psl"])
