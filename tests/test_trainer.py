"""The training loop: a tiny model overfits a fixed batch; checkpoints resume bit-exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from climrecon.models.checkpoint import (
    CheckpointError,
    CheckpointMetadata,
    NetworkSpec,
    load_networks,
    read_checkpoint,
    strip_training_state,
)
from climrecon.models.edm import EDMLoss, EDMPrecond
from climrecon.models.samplers import make_generator, seed_for
from climrecon.models.trainer import Batch, TrainConfig, train
from climrecon.models.unet import UNet, UNetConfig

LOSS = EDMLoss()  # the tiny models use the default EDMConfig


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(dropout: float = 0.0) -> EDMPrecond:
    torch.manual_seed(0)
    cfg = UNetConfig(
        out_channels=1,
        cond_channels=2,
        base_channels=16,
        channel_mults=(1, 2),
        num_blocks=1,
        attention_levels=(1,),
        dropout=dropout,
    )
    return EDMPrecond(UNet(cfg))


def fixed_batch(b: int = 4, size: int = 8, seed: int = 0) -> Batch:
    """A target that is a deterministic function of the conditioning, so the loss can approach 0."""
    g = make_generator(seed)
    cond = torch.randn(b, 2, size, size, generator=g)
    target = 0.8 * cond[:, :1] - 0.5 * cond[:, 1:]
    return Batch((target - target.mean()) / target.std(), cond, torch.rand(b, generator=g))


def batches_from(step: int):
    """A resumable stream: batch k is a pure function of k."""
    while True:
        yield fixed_batch(seed=seed_for(7, step))
        step += 1


def eval_loss(model: EDMPrecond, batch: Batch) -> float:
    """Loss at a fixed draw of noise levels and noise (64 draws per sample), so before/after compare."""
    rep = lambda t: t.repeat_interleave(64, dim=0)  # noqa: E731
    with torch.no_grad():
        loss = EDMLoss(model.config)(
            model.eval(),
            rep(batch.target),
            rep(batch.cond),
            rep(batch.time_of_year),
            generator=make_generator(9),
        )
    return float(loss.mean())


def test_tiny_model_overfits_a_fixed_batch(tmp_path):
    model, batch = tiny_model(), fixed_batch()
    before = eval_loss(model, batch)
    logs = []
    cfg = TrainConfig(
        max_steps=150,
        lr=5e-3,
        warmup_steps=10,
        lr_schedule="cosine",
        grad_clip=None,
        ema_halflife_steps=20,
        checkpoint_every=1000,
        log_every=50,
    )
    result = train(
        model,
        lambda step: iter(lambda: batch, None),
        cfg,
        loss=LOSS,
        checkpoint_path=tmp_path / "m.pt",
        progress=False,
        on_log=logs.append,
    )
    assert result.step == 150 and len(result.losses) == 150 and result.resumed_from == 0
    assert [r["step"] for r in logs] == [50, 100, 150] and set(logs[0]) == {
        "step",
        "loss",
        "lr",
        "grad_norm",
        "steps_per_s",
    }
    nets, meta = load_networks(result.checkpoint_path)
    ema = nets["denoiser"]
    assert meta.step == 150 and meta.train["lr"] == 5e-3 and meta.method == "edm"
    after = eval_loss(ema, batch)
    print(f"fixed-noise loss before {before:.3f}, after {after:.3f} (EMA)")
    assert before == pytest.approx(1.0, abs=0.15)  # unit-variance data, F = 0 at init
    assert after < before / 5, (before, after)
    assert sum(result.losses[-20:]) < sum(result.losses[:20]) / 2


def _state(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path).tensors


class Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    cfg = TrainConfig(max_steps=10, lr=1e-3, warmup_steps=3, checkpoint_every=4, log_every=1, seed=3)
    # uninterrupted reference (dropout exercises the global RNG that resume must restore)
    ref = train(
        tiny_model(dropout=0.2),
        batches_from,
        cfg,
        loss=LOSS,
        checkpoint_path=tmp_path / "ref.pt",
        progress=False,
    )

    def crash_at_6(record):
        if record["step"] == 6:
            raise Interrupt

    path = tmp_path / "run.pt"
    with pytest.raises(Interrupt):
        train(
            tiny_model(dropout=0.2),
            batches_from,
            cfg,
            loss=LOSS,
            checkpoint_path=path,
            progress=False,
            on_log=crash_at_6,
        )
    assert read_checkpoint(path).metadata.step == 4
    # a fresh process would rebuild the model from scratch; the checkpoint supplies every state
    torch.manual_seed(12345)
    resumed = train(
        tiny_model(dropout=0.2), batches_from, cfg, loss=LOSS, checkpoint_path=path, progress=False
    )
    assert resumed.resumed_from == 4 and resumed.step == 10
    assert resumed.losses == ref.losses
    a, b = _state(ref.checkpoint_path), _state(path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a finished run returns at once with the same result
    again = train(tiny_model(dropout=0.2), batches_from, cfg, loss=LOSS, checkpoint_path=path, progress=False)
    assert (
        again.resumed_from == 10
        and again.losses == ref.losses
        and again.content_sha256 == resumed.content_sha256
    )


def test_resume_refuses_other_models_and_inference_only_files(tmp_path):
    cfg = TrainConfig(max_steps=2, warmup_steps=0, checkpoint_every=1)
    path = tmp_path / "m.pt"
    train(tiny_model(), batches_from, cfg, loss=LOSS, checkpoint_path=path, progress=False)
    other = EDMPrecond(
        UNet(
            UNetConfig(
                out_channels=1,
                cond_channels=2,
                base_channels=8,
                channel_mults=(1, 2),
                num_blocks=1,
                attention_levels=(),
            )
        )
    )
    with pytest.raises(CheckpointError, match="written for another model"):
        train(other, batches_from, cfg, loss=LOSS, checkpoint_path=path, progress=False)
    slim = tmp_path / "slim.pt"
    strip_training_state(path, slim)
    with pytest.raises(CheckpointError, match="holds no training state"):
        train(
            tiny_model(),
            batches_from,
            TrainConfig(max_steps=3),
            loss=LOSS,
            checkpoint_path=slim,
            progress=False,
        )
    # resume=False starts over and overwrites
    fresh = train(
        tiny_model(), batches_from, cfg, loss=LOSS, checkpoint_path=slim, resume=False, progress=False
    )
    assert fresh.resumed_from == 0 and read_checkpoint(slim).header["training"]["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "slim.pt"]  # no temp files left


def test_metadata_is_carried_and_checked(tmp_path):
    model = tiny_model()
    meta = CheckpointMetadata(
        method="dpdm",
        networks={"denoiser": NetworkSpec.of(model)},
        variables=("tas",),
        cond_channels=("tas_coarse", "orog"),
        data={"source": "synthetic"},
    )
    train(
        model,
        batches_from,
        TrainConfig(max_steps=1, warmup_steps=0),
        loss=LOSS,
        checkpoint_path=tmp_path / "m.pt",
        metadata=meta,
        progress=False,
    )
    _, loaded = load_networks(tmp_path / "m.pt", expect={"variables": ["tas"], "method": "dpdm"})
    assert (
        loaded.cond_channels == ("tas_coarse", "orog")
        and loaded.step == 1
        and loaded.data == {"source": "synthetic"}
    )
    wrong = CheckpointMetadata(
        method="dpdm",
        networks={"denoiser": NetworkSpec(UNetConfig(out_channels=1, cond_channels=2))},
        variables=("tas",),
    )
    with pytest.raises(ValueError, match="does not describe the model"):
        train(
            tiny_model(),
            batches_from,
            TrainConfig(max_steps=1),
            loss=LOSS,
            checkpoint_path=tmp_path / "x.pt",
            metadata=wrong,
            progress=False,
        )


def test_exhausted_batches_and_config_checks(tmp_path):
    two = [fixed_batch(), fixed_batch(seed=1)]
    with pytest.raises(ValueError, match="ran out after 2 batch"):
        train(
            tiny_model(),
            iter(two),
            TrainConfig(max_steps=5, warmup_steps=0),
            loss=LOSS,
            checkpoint_path=tmp_path / "m.pt",
            progress=False,
        )
    cfg = TrainConfig(lr=1e-3, warmup_steps=4, max_steps=14, lr_schedule="cosine")
    assert [cfg.lr_at(s) for s in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert cfg.lr_at(9) == pytest.approx(5e-4) and cfg.lr_at(14) == pytest.approx(0, abs=1e-12)
    assert cfg.ema_beta(10_000) == pytest.approx(0.5 ** (1 / 500)) and cfg.ema_beta(1) < 1e-5
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        TrainConfig(max_steps=0)
    assert math.isfinite(cfg.lr_at(100))


def test_second_network_trains_beside_a_frozen_first_and_resume_checks_the_role(tmp_path):
    """A two-stage method: the regression network is trained first, then the denoiser with the regression's
    EMA weights frozen into every checkpoint; resuming the wrong role is refused."""
    cfg = TrainConfig(max_steps=3, warmup_steps=0, checkpoint_every=1)
    first = tiny_model()
    path = tmp_path / "two.pt"
    train(
        first,
        batches_from,
        cfg,
        loss=LOSS,
        checkpoint_path=path,
        role="regression",
        progress=False,
        metadata=CheckpointMetadata("two-stage", {"regression": NetworkSpec.of(first)}),
    )
    frozen = {"regression": read_checkpoint(path).ema_states()["regression"]}
    second = tiny_model(dropout=0.1)
    meta = CheckpointMetadata(
        "two-stage", {"regression": NetworkSpec.of(first), "denoiser": NetworkSpec.of(second)}
    )
    with pytest.raises(CheckpointError, match="is training the network 'regression', not 'denoiser'"):
        train(
            second,
            batches_from,
            cfg,
            loss=LOSS,
            checkpoint_path=path,
            metadata=meta,
            frozen=frozen,
            progress=False,
        )
    both = tmp_path / "both.pt"
    train(
        second,
        batches_from,
        cfg,
        loss=LOSS,
        checkpoint_path=both,
        metadata=meta,
        frozen=frozen,
        progress=False,
    )
    contents = read_checkpoint(both)
    assert contents.header["training"]["role"] == "denoiser"
    for k, v in frozen["regression"].items():
        assert torch.equal(contents.ema_states()["regression"][k], v), k
    nets, _ = load_networks(both)
    assert set(nets) == {"regression", "denoiser"}
    with pytest.raises(ValueError, match="frozen"):
        train(
            second,
            batches_from,
            cfg,
            loss=LOSS,
            checkpoint_path=tmp_path / "x.pt",
            metadata=meta,
            progress=False,
        )
