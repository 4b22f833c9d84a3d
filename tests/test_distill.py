"""Progressive distillation (models/distill.py, methods/dpdm.py ``distill``): a few-step DDIM student
reproduces its Heun teacher, and the product only ever samples a student on its own noise levels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_samplers import MU, S, gaussian_denoiser, latents
from test_training_data import tiny_train_config, write_tiny_stores

from climrecon.config import ClimReconConfig, ConfigError, SamplerConfig, load_config
from climrecon.flows.train import run_training
from climrecon.methods import MethodError
from climrecon.methods.dpdm import distilled_sampler
from climrecon.models.checkpoint import load_networks
from climrecon.models.distill import DistillationLoss, student_levels
from climrecon.models.samplers import ddim_sampler, edm_sampler, karras_sigmas, make_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_student_levels_are_every_kth_teacher_level():
    student, teacher = student_levels(4, 16)
    assert len(student) == 5 and len(teacher) == 17 and student[-1] == 0.0
    assert list(student) == karras_sigmas(16).tolist()[::4]
    assert student[0] == pytest.approx(80.0) and 0.05 < student[3] < 0.1
    with pytest.raises(ValueError, match="multiple"):
        student_levels(3, 16)


def test_target_makes_one_euler_step_land_on_the_teachers_k_heun_steps():
    loss = DistillationLoss(lambda x, s, c, t: gaussian_denoiser(x, s), 4, 16)
    x = 7.0 * torch.randn(64, 1, generator=make_generator(0), dtype=torch.float64)
    for k in range(4):
        s, s_next = loss.levels[k], loss.levels[k + 1]
        target = loss.target(x.float(), k, None, None).double()
        euler = (s_next / s) * x + (1 - s_next / s) * target
        sub = loss.teacher_levels[4 * k : 4 * k + 5]
        heun = edm_sampler(gaussian_denoiser, x / s, sigmas=sub, dtype=torch.float64)
        assert torch.allclose(euler, heun, atol=1e-4), k


class AffineStudent(torch.nn.Module):
    """D(x; s_k) = a_k x + b_k: for Gaussian data the teacher's segment maps are affine, so this student can
    match them exactly at its own levels."""

    def __init__(self, levels):
        super().__init__()
        self.levels = torch.tensor(levels[:-1], dtype=torch.float32)
        self.a = torch.nn.Parameter(torch.zeros(len(self.levels)))
        self.b = torch.nn.Parameter(torch.zeros(len(self.levels)))

    def forward(self, x, sigma, cond=None, time_of_year=None):
        k = (sigma.reshape(-1, 1) - self.levels).abs().argmin(dim=1)
        return self.a[k].reshape(-1, *([1] * (x.ndim - 1))) * x + self.b[k].reshape(-1, *([1] * (x.ndim - 1)))


def test_a_distilled_four_step_student_matches_the_sixteen_step_teacher():
    teacher = lambda x, s, c, t: gaussian_denoiser(x, s)  # noqa: E731
    loss = DistillationLoss(teacher, 4, 16, sigma_data=S)
    student = AffineStudent(loss.levels)
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    g = make_generator(1)
    for _ in range(600):
        y = MU + S * torch.randn(256, 1, generator=g)
        opt.zero_grad()
        loss(student, y, generator=g).mean().backward()
        opt.step()
    z = latents(4000)
    with torch.no_grad():
        teacher_x = edm_sampler(gaussian_denoiser, z, num_steps=16).double()
        student_x = ddim_sampler(lambda x, s: student(x, s), z, sigmas=loss.levels).double()
    plain_x = ddim_sampler(gaussian_denoiser, z, sigmas=loss.levels).double()  # the teacher, 4 Euler steps
    student_err = float((student_x - teacher_x).abs().max())
    plain_err = float((plain_x - teacher_x).abs().max())
    assert student_err < 0.02 and student_err < plain_err / 10, (student_err, plain_err)


def test_distilled_sampler_takes_the_students_levels_and_refuses_other_settings():
    record = {"teacher": "dpdm.pt", "sigmas": [80.0, 15.7, 1.86, 0.085, 0.0]}
    s = distilled_sampler(SamplerConfig(), record, "student.pt")
    assert s.solver == "ddim" and s.num_steps == 4 and s.sigmas == tuple(record["sigmas"])
    assert s.network_calls() == 4
    kept = distilled_sampler(SamplerConfig(overlap=4, max_patches_per_batch=5, sigmas=None), record, "s.pt")
    assert kept.overlap == 4 and kept.max_patches_per_batch == 5 and kept.sigmas == tuple(record["sigmas"])
    for bad in ({"num_steps": 10}, {"solver": "dpmpp2m"}, {"S_churn": 10.0}, {"sigma_max": 40.0}):
        with pytest.raises(MethodError, match="4-step student distilled from dpdm.pt"):
            distilled_sampler(SamplerConfig(**bad), record, "student.pt")


def test_sampler_config_checks_explicit_levels_and_counts_network_calls():
    assert SamplerConfig(num_steps=18, solver="heun").network_calls() == 35
    assert SamplerConfig(num_steps=8, solver="dpmpp2m").network_calls() == 8
    with pytest.raises(ConfigError, match="noise levels"):
        load_config(None, ["sampler.num_steps=4", "sampler.sigmas=[80.0, 1.0, 0.0]"])
    with pytest.raises(ConfigError, match="multiple"):
        load_config(None, ["train.distill.steps=3", "train.distill.teacher_steps=16"])


def _tiny(tmp_path, truth, static, name, **train):
    config = tiny_train_config(truth, static, tmp_path / f"{name}.pt", max_steps=3, warmup_steps=1, **train)
    return ClimReconConfig.model_validate(config)


def test_distill_trains_a_student_that_the_method_samples_on_its_own_levels(tmp_path):
    truth, static = write_tiny_stores(tmp_path)
    teacher = run_training(_tiny(tmp_path, truth, static, "teacher"))
    teacher_ema = str(Path(teacher.checkpoint_path).with_suffix(".ema.pt"))
    spec = {"distill": {"teacher": teacher_ema, "steps": 2, "teacher_steps": 4}}
    result = run_training(_tiny(tmp_path, truth, static, "student", **spec))
    networks, meta = load_networks(tmp_path / "student.ema.pt")
    _, tmeta = load_networks(teacher_ema)
    record = meta.data["distilled"]
    assert record["teacher"] == "teacher.ema.pt" and len(record["sigmas"]) == 3 and record["sigmas"][-1] == 0
    assert meta.normalization == tmeta.normalization and meta.cond_channels == tmeta.cond_channels
    assert meta.step == 3 and len(result.losses) == 3
    # resuming a finished distillation is a no-op
    again = run_training(_tiny(tmp_path, truth, static, "student", **spec))
    assert again.checkpoint_path == result.checkpoint_path
    # the method samples the student with 2 DDIM steps on its levels; explicit other settings are refused
    from climrecon import methods

    cfg = load_config(None, [f"method.checkpoint={tmp_path / 'student.ema.pt'}"])
    model = methods.build(cfg.method, cfg.sampler)
    assert model.sampler.solver == "ddim" and model.sampler.num_steps == 2
    with pytest.raises(MethodError, match="2-step student"):
        bad = load_config(None, [f"method.checkpoint={tmp_path / 'student.ema.pt'}", "sampler.num_steps=12"])
        methods.build(bad.method, bad.sampler)
    # a student trained further starts from its own weights and records the earlier run
    student_ema = str(tmp_path / "student.ema.pt")
    more = {"distill": {**spec["distill"], "student": student_ema}}
    run_training(_tiny(tmp_path, truth, static, "student-more", **more))
    _, mmeta = load_networks(tmp_path / "student-more.ema.pt")
    cont = mmeta.data["distilled"]["continued_from"]
    assert cont["student"] == "student.ema.pt" and cont["steps"] == [3] and mmeta.step == 3
    assert mmeta.data["distilled"]["sigmas"] == record["sigmas"]
    # ... only a student of the same teacher and levels
    other = {"distill": {**spec["distill"], "steps": 1, "student": student_ema}}
    with pytest.raises(MethodError, match="sigmas"):
        run_training(_tiny(tmp_path, truth, static, "s4", **other))
    with pytest.raises(MethodError, match="not a distilled student"):
        run_training(
            _tiny(tmp_path, truth, static, "s5", distill={**spec["distill"], "student": teacher_ema})
        )
    # a student is not a teacher; other training data (other statistics) is refused
    with pytest.raises(MethodError, match="itself a distilled student"):
        spec2 = {"distill": {"teacher": str(tmp_path / "student.ema.pt"), "steps": 1, "teacher_steps": 2}}
        run_training(_tiny(tmp_path, truth, static, "s2", **spec2))
    with pytest.raises(MethodError, match="does not match the teacher"):
        run_training(
            _tiny(
                tmp_path, truth, static, "s3", train_years=[2001, 2001], validation_years=[2000, 2000], **spec
            )
        )


def test_methods_without_a_distillation_recipe_refuse_train_distill(tmp_path):
    cfg = load_config(None, ["method.name=zssd", "train.distill.steps=4"])
    with pytest.raises(MethodError, match="'zssd' cannot be distilled"):
        run_training(cfg)


@pytest.mark.parametrize("name", ["distill-dpdm-westus-x8", "distill-dpdm-westus-x8-more"])
def test_distill_configs_are_the_shipped_teachers_own_setup(name):
    with open(f"configs/{name}.yaml") as f:
        distill = yaml.safe_load(f)
    with open("configs/train-dpdm-westus-x8.yaml") as f:
        train = yaml.safe_load(f)
    assert distill["method"].pop("checkpoint") == "checkpoints/dpdm-westus-x8.pt"
    assert distill["method"] == train["method"]
    same = ("truth", "static", "variables", "factor", "train_years", "validation_years", "heldout_years")
    assert {k: distill["train"][k] for k in same} == {k: train["train"][k] for k in same}
    if name.endswith("-more"):  # further training of the first config's student, same recipe and levels
        assert distill["train"]["distill"].pop("student") == "checkpoints/distilled-dpdm-westus-x8.pt"
        with open("configs/distill-dpdm-westus-x8.yaml") as f:
            first = yaml.safe_load(f)
        assert distill["train"]["distill"] == first["train"]["distill"]
