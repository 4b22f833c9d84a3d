"""Typed configuration for every stage, loaded from YAML and validated by pydantic.

Contract:
- ``load_config(path, overrides)`` returns a :class:`ClimReconConfig`; any unknown key, wrong type or
  missing field raises :class:`ConfigError` whose message names the file and the dotted key at fault.
- Overrides are ``dotted.key=value`` strings (value parsed as YAML), applied before validation, so
  ``--set ingest.chunks.time=24`` behaves exactly like editing the file.
- Secrets never live here: storage options in a config are non-secret (endpoint, region, anon); keys and
  tokens come from the environment at use time (see :mod:`climrecon.storage`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from climrecon.storage import SECRET_OPTION_KEYS, default_data_home

__all__ = [
    "ConfigError",
    "Region",
    "StorageConfig",
    "CatalogQuery",
    "IngestConfig",
    "RegridConfig",
    "SyntheticConfig",
    "SampleCatalogConfig",
    "TrainSection",
    "MethodConfig",
    "SamplerConfig",
    "DownscaleConfig",
    "AggregateConfig",
    "EvaluateConfig",
    "TimeSelection",
    "FineVariable",
    "FineDataConfig",
    "ClimReconConfig",
    "load_config",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and key."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MethodConfig(BaseModel):
    """Base of every method's config: ``name`` is the registry key; each method adds and validates its keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    label: str | None = Field(
        None,
        description="name of this entry in evaluation tables (default: name), e.g. two configs of one method",
    )

    @property
    def key(self) -> str:
        """How results of this config are labelled: ``label`` or ``name``."""
        return self.label or self.name


class SamplerConfig(BaseModel):
    """How diffusion methods sample (shared by the downscale stage and the evaluation).

    ``overlap``, ``max_patches_per_batch`` and ``device`` change how work is cut, never what a member is
    (fixed-shape network calls, per-item seeds): bitwise on CPU.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    num_steps: int | None = Field(
        None,
        ge=1,
        description="sampler steps (Heun: 2 network calls each but the last); default: the method's own",
    )
    solver: Literal["heun", "ddim", "dpmpp2m"] | None = Field(
        None,
        description="heun (EDM Alg. 2), ddim (Euler when eta=0), dpmpp2m (DPM-Solver++(2M)); default: the "
        "method's own (DPDM: 12 dpmpp2m steps, the cheapest sampler with the skill of 18 Heun steps in "
        "benchmarks/results/sampling_cost.json; CorrDiff, ZSSD, spatiotemporal: 18 heun steps)",
    )
    sigma_max: float = Field(80.0, gt=0, description="noise level the chains start from (EDM: 80)")
    sigma_min: float = Field(0.002, gt=0, description="last non-zero noise level (EDM: 0.002)")
    rho: float = Field(7.0, gt=0, description="time-step exponent of EDM Eq. 5")
    sigmas: tuple[float, ...] | None = Field(
        None,
        description="explicit noise levels (decreasing, ending in 0) instead of Eq. 5; a distilled "
        "checkpoint sets its own",
    )
    blend: Literal["every_step", "once"] = "every_step"
    overlap: int | None = Field(
        None, ge=0, description="tile overlap in fine cells; default: patch_size // 4"
    )
    max_patches_per_batch: int | Literal["auto"] = Field(
        32,
        description="patches per network call (fixed call shape, across months, members and tiles); auto: "
        "sized from the device's free memory (climrecon.models.fastpath.auto_patch_batch)",
    )
    network: Literal["eager", "channels_last", "compile"] = Field(
        "eager",
        description="how the network runs: eager, channels_last (NHWC weights) or compile (torch.compile, "
        "eager fallback when it cannot compile; pays ~1-2 min per process once)",
    )
    S_churn: float = Field(0.0, ge=0, description="EDM stochastic churn (0: deterministic Heun)")
    eta: float = Field(0.0, ge=0, description="DDIM stochasticity (0: deterministic)")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def with_defaults(self, solver: str, num_steps: int) -> SamplerConfig:
        """This sampler with a method's default ``solver`` and ``num_steps`` where they are unset; churn and
        eta are checked against the solver that results."""
        unset = {"solver": solver, "num_steps": num_steps}
        out = self.model_copy(update={k: v for k, v in unset.items() if getattr(self, k) is None})
        if out.S_churn and out.solver != "heun":
            raise ValueError(f"sampler.S_churn needs solver heun; this method samples with {out.solver}")
        if out.eta and out.solver != "ddim":
            raise ValueError(f"sampler.eta needs solver ddim; this method samples with {out.solver}")
        return out

    def _resolved(self) -> None:
        if self.solver is None or self.num_steps is None:
            raise ValueError("sampler.solver / num_steps unset: a method fills them in (with_defaults)")

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`climrecon.models.tiled.sample_tiled` (solver and steps resolved)."""
        self._resolved()
        return {
            "num_steps": self.num_steps,
            "solver": self.solver,
            "blend": self.blend,
            "max_patches_per_batch": self.max_patches_per_batch,
            "S_churn": self.S_churn,
            "eta": self.eta,
            "sigma_max": self.sigma_max,
            "sigma_min": self.sigma_min,
            "rho": self.rho,
            "sigmas": self.sigmas,
        }

    def network_calls(self) -> int:
        """Network evaluations (NFE) per member: Heun 2 per step but the last, one per step otherwise."""
        self._resolved()
        return 2 * self.num_steps - 1 if self.solver == "heun" else self.num_steps

    @model_validator(mode="after")
    def _levels(self) -> SamplerConfig:
        if self.max_patches_per_batch != "auto" and self.max_patches_per_batch < 1:
            raise ValueError(
                f"sampler.max_patches_per_batch must be >= 1 or auto, got {self.max_patches_per_batch}"
            )
        if self.sigmas is not None and self.num_steps is not None and len(self.sigmas) != self.num_steps + 1:
            raise ValueError(
                f"sampler.sigmas holds {len(self.sigmas)} noise levels; num_steps={self.num_steps} needs "
                f"{self.num_steps + 1} (set both)"
            )
        return self

    def describe(self) -> str:
        churn = f", churn {self.S_churn:g}" if self.S_churn else (f", eta {self.eta:g}" if self.eta else "")
        levels = ", own noise levels" if self.sigmas is not None else ""
        network = f", network {self.network}" if self.network != "eager" else ""
        steps = f"{self.num_steps or 'default'} {self.solver or 'default-solver'} steps"
        return f"{steps}, blend {self.blend}{churn}{levels}{network}"


def _method(raw: Any) -> MethodConfig:
    """A method's config validated by the registry (a pydantic union discriminated by ``name``, built from the
    registered methods, so a method registered anywhere validates its own keys here)."""
    from climrecon.methods import parse_config

    return parse_config(raw)


class Region(_Model):
    """A lat/lon box in degrees; longitudes in -180..180 or 0..360 (lon_min may exceed lon_max across the dateline)."""

    lat_min: float = Field(ge=-90, le=90)
    lat_max: float = Field(ge=-90, le=90)
    lon_min: float = Field(ge=-180, le=360)
    lon_max: float = Field(ge=-180, le=360)

    @model_validator(mode="after")
    def _ordered(self) -> Region:
        if self.lat_min >= self.lat_max:
            raise ValueError(f"lat_min ({self.lat_min}) must be below lat_max ({self.lat_max})")
        return self


def _secret_paths(obj: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every secret-looking key at any depth of ``obj`` (dicts and lists)."""
    out: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}{k}"
            if str(k).lower() in SECRET_OPTION_KEYS:
                out.append(path)
            else:
                out += _secret_paths(v, path + ".")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            out += _secret_paths(v, f"{prefix}{i}.")
    return out


class StorageConfig(_Model):
    """Where stores are written: a local directory or any fsspec URL (s3://bucket/prefix)."""

    root: str = "outputs"
    options: dict[str, Any] = Field(default_factory=dict, description="non-secret fsspec storage options")

    @field_validator("options")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(_secret_paths(v))
        if bad:
            raise ValueError(
                f"secret storage option(s) {bad} must not be written in a config file; set them in the "
                "environment instead (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or CLIMRECON_STORAGE_OPTIONS as JSON)"
            )
        return v


class CatalogQuery(_Model):
    """An intake-esm search: every given column must match; ``time`` clips to [start, end] (YYYY or YYYY-MM)."""

    source_id: str | list[str] | None = None
    experiment_id: str | list[str] | None = None
    member_id: str | list[str] | None = None
    variable_id: str | list[str] | None = None
    table_id: str | list[str] | None = None
    time: tuple[str, str] | None = None

    def search_terms(self) -> dict[str, Any]:
        """The catalog columns to search on (``time`` is applied after opening)."""
        return {k: v for k, v in self.model_dump(exclude={"time"}).items() if v is not None}


class IngestConfig(_Model):
    catalog: str | None = Field(None, description="intake-esm JSON; default: the built sample catalog")
    query: CatalogQuery = CatalogQuery(source_id="MPI-ESM-LR", variable_id=["tas", "uas", "vas"])
    lon_convention: Literal["-180..180", "0..360"] = "-180..180"
    time_chunk: int = Field(12, ge=1, description="months (or years) per zarr chunk and per write block")
    zarr_format: Literal[2, 3] = 3


# Western US (Pacific coast, Cascades, Sierra Nevada, Great Basin, Rockies), inside the UM A1B North
# America domain; 20 x 20 deg so that coarsening by 4, 8, 16 and 20 (1, 2, 4, 5 deg) tiles it exactly.
DEFAULT_REGION = Region(lat_min=30.0, lat_max=50.0, lon_min=-125.0, lon_max=-105.0)


class RegridConfig(_Model):
    """Put an ingested store on the unified coarse grid and on the high-resolution target grid."""

    source: str | None = Field(
        None, description="ingested store URL; default: the ingest output of the same run"
    )
    region: Region = DEFAULT_REGION
    resolution: float = Field(0.25, gt=0, description="target (fine) grid spacing, degrees")
    coarse_resolution: float = Field(5.0, gt=0, description="unified coarse grid spacing, degrees (ZSSD: 5)")
    fine_method: Literal["bilinear", "conservative"] = "bilinear"
    static: str | None = Field(
        None, description="static-fields store (global); default: the one the sample catalog built"
    )
    time_chunk: int = Field(12, ge=1, description="time steps per zarr chunk and per write block")
    zarr_format: Literal[2, 3] = 3


class SyntheticConfig(_Model):
    """The synthetic reanalysis: a labelled offline stand-in for ERA5 monthly means."""

    region: Region = DEFAULT_REGION
    resolution: float = Field(0.25, gt=0)
    start_year: int = 1961
    end_year: int = 2020
    variables: list[Literal["tas", "uas", "vas", "pr"]] = ["tas", "uas", "vas", "pr"]
    seed: int = 20261121
    chunk_months: int = Field(12, ge=1)

    @model_validator(mode="after")
    def _span(self) -> SyntheticConfig:
        if self.end_year < self.start_year:
            raise ValueError(f"end_year ({self.end_year}) is before start_year ({self.start_year})")
        return self


class SampleCatalogConfig(_Model):
    """Where the offline sample catalog (real packaged data + synthetic reanalysis) is built."""

    directory: str | None = Field(None, description="default: <data_home>/sample")
    synthetic: SyntheticConfig = SyntheticConfig()


class DistillSection(_Model):
    """Distil a trained diffusion checkpoint (the teacher) into a few-step student
    (:mod:`climrecon.models.distill`); the student keeps the teacher's network, data and statistics."""

    teacher: str | None = Field(
        None, description="teacher checkpoint; default: method.checkpoint (the shipped one when unset)"
    )
    steps: int = Field(4, ge=1, description="student steps = network calls per member (DDIM/Euler)")
    teacher_steps: int = Field(16, ge=1, description="teacher Heun steps; a multiple of steps")
    student: str | None = Field(
        None,
        description="start the student from this student checkpoint (one distilled from the same teacher with "
        "the same steps) instead of the teacher's weights: more training for a shipped student",
    )

    @model_validator(mode="after")
    def _multiple(self) -> DistillSection:
        if self.teacher_steps % self.steps:
            raise ValueError(
                f"distill.teacher_steps ({self.teacher_steps}) must be a multiple of distill.steps ({self.steps})"
            )
        return self


class TrainSection(_Model):
    """The data and the optimisation loop of ``climrecon train`` (the model itself is the ``method:`` section).

    Perfect-model pairs from a fine truth store. Year ranges are inclusive; ``heldout_years`` are never read
    for training (nor statistics), only checked to be disjoint from the training and validation years.
    """

    truth: str | None = Field(
        None,
        description="fine truth Zarr (synthetic reanalysis or ERA5 monthly means); default: the sample's",
    )
    static: str | None = Field(
        None, description="global static-fields store; default: the sample's static store"
    )
    variables: list[str] | None = Field(
        None,
        min_length=1,
        description="variables to learn; default: every variable of data: when given, else tas, uas, vas",
    )
    factor: int = Field(8, ge=2, description="perfect-model coarsening factor (fine cells per coarse cell)")
    train_years: tuple[int, int] = (1961, 2005)
    validation_years: tuple[int, int] = (2006, 2010)
    heldout_years: tuple[int, int] = (2011, 2020)
    batch_size: int = Field(16, ge=1)
    max_steps: int = Field(4000, ge=1)
    lr: float = Field(6e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    ema_halflife_steps: float = Field(200.0, gt=0)
    checkpoint_every: int = Field(250, ge=1)
    seed: int = Field(0, ge=0)
    threads: int = Field(1, ge=1, description="torch intra-op threads on CPU")
    device: str = "auto"
    checkpoint: str = Field(
        "outputs/train/dpdm-westus-x8.pt", description="training checkpoint path (resumable)"
    )
    distill: DistillSection | None = Field(
        None, description="train a few-step student of method.checkpoint instead of a model from scratch"
    )

    @model_validator(mode="after")
    def _years(self) -> TrainSection:
        spans = {
            "train_years": self.train_years,
            "validation_years": self.validation_years,
            "heldout_years": self.heldout_years,
        }
        for name, (a, b) in spans.items():
            if b < a:
                raise ValueError(f"{name} ({a}, {b}) ends before it starts")
        h0, h1 = self.heldout_years
        for name in ("train_years", "validation_years"):
            a, b = spans[name]
            if a <= h1 and h0 <= b:
                raise ValueError(
                    f"{name} ({a}, {b}) overlaps heldout_years ({h0}, {h1}): held-out years must never be trained on"
                )
        return self


class DownscaleConfig(_Model):
    """Patch-based diffusion sampling of a regridded store into an N-member ensemble (downscale stage).

    The method is the ``method:`` section and its sampling the ``sampler:`` section. A work unit is
    ``months_per_unit`` time steps x ``members_per_unit`` members; the member store has chunks of 1 member x
    ``time_chunk`` steps, so ``months_per_unit`` must be a multiple of ``time_chunk``. Unit sizes only change
    how the work is cut, never the bytes (seeds derive from (seed, absolute month, member)), so they are not
    part of the store's key.
    """

    fine: str | None = Field(
        None, description="regridded fine store (conditioning); default: this config's regrid output"
    )
    static: str | None = Field(
        None, description="static store on the fine grid; default: this config's regrid output"
    )
    coarse: str | None = Field(
        None,
        description="regridded coarse store (read by methods that work on the coarse grid itself: the bias "
        "correction, a first guess, guidance); default: this config's regrid output",
    )
    fit_coarse: str | None = Field(
        None,
        description="regridded coarse store a bias correction is fitted on (e.g. the same model's historical "
        "run, for a scenario that does not cover the training years; same coarse grid); default: the input's "
        "own coarse store. The reconstruct flow sets it for each scenario that has a historical run beside it",
    )
    members: int = Field(8, ge=1, description="ensemble members")
    seed: int = Field(20261121, ge=0, description="base seed; member m of month t uses seed_for(seed, t, m)")
    months_per_unit: int = Field(12, ge=1, description="time steps per work unit (a multiple of time_chunk)")
    members_per_unit: int = Field(
        2, ge=1, description="members per work unit (units run in parallel on workers)"
    )
    lease_seconds: float = Field(
        1800.0,
        gt=0,
        description="a unit's lease: another run waits this long at most for a unit being sampled",
    )
    time_chunk: int = Field(12, ge=1, description="time steps per zarr chunk of the member store")
    zarr_format: Literal[2, 3] = 3

    @model_validator(mode="after")
    def _units_align(self) -> DownscaleConfig:
        if self.months_per_unit % self.time_chunk:
            raise ValueError(
                f"months_per_unit ({self.months_per_unit}) must be a multiple of time_chunk ({self.time_chunk}): "
                "a work unit writes whole zarr chunks"
            )
        return self


class AggregateConfig(_Model):
    """What the aggregate stage computes ."""

    quantiles: list[float] = Field(default_factory=lambda: [0.05, 0.5, 0.95], description="in [0, 1]")
    thresholds: dict[str, list[float]] = Field(
        default_factory=lambda: {"tas": [273.15, 303.15]},
        description="per variable, in its units: exceedance probabilities P(x > t)",
    )
    include_members: bool = Field(False, description="also copy the members into the output store")
    time_chunk: int = Field(120, ge=1, description="months per output chunk and per write block")
    zarr_format: Literal[2, 3] = 3

    @field_validator("quantiles")
    @classmethod
    def _quantiles(cls, v: list[float]) -> list[float]:
        bad = [q for q in v if not 0.0 <= q <= 1.0]
        if bad:
            raise ValueError(f"quantiles must lie in [0, 1] (fractions, not percent); got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"quantiles must be distinct; got {v}")
        return sorted(v)

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, list[float]]) -> dict[str, list[float]]:
        for name, values in v.items():
            if not values or len(set(values)) != len(values):
                raise ValueError(
                    f"thresholds.{name} must be a non-empty list of distinct values; got {values}"
                )
        return {k: sorted(vals) for k, vals in v.items()}


class EvaluateConfig(_Model):
    """Perfect-model evaluation: fine truth -> area means by each factor -> every method -> skill on held-out years.

    The truth is ``truth`` (a Zarr store or netCDF file of fine monthly fields, e.g. ERA5 monthly means),
    else the catalog search ``truth_query`` (in ``catalog``, default the sample catalog), else the sample
    catalog's synthetic reanalysis. Baselines are fitted on ``train_years`` only; scores use ``heldout_years``
    only (every ``month_stride``-th month of them, to keep a CPU run affordable). ``methods`` are registry
    names or method configs (``{name: dpdm, checkpoint: ...}``); a method that serves only some factors (a
    trained checkpoint) runs only at those. Ensemble methods have the sizes ``ensemble_sizes`` (the first k
    members of one max(ensemble_sizes)-member ensemble, seeded per (month, member) as in the downscale stage),
    sampled with the ``sampler:`` section.
    """

    truth: str | None = Field(
        None, description="fine truth Zarr/netCDF path or URL; default: see truth_query"
    )
    truth_query: CatalogQuery | None = Field(None, description="catalog search for the truth (one dataset)")
    catalog: str | None = Field(
        None, description="intake-esm JSON for truth_query / defaults; default: the sample catalog"
    )
    static: str | None = Field(None, description="global static-fields store; default: the sample catalog's")
    variables: list[str] | None = Field(
        None,
        min_length=1,
        description="variables to score; default: every variable of data: when given, else tas, uas, vas, pr",
    )
    factors: list[int] = Field(
        default_factory=lambda: [4, 8, 16, 20], description="coarsening factors (>= 2)"
    )
    methods: list[SerializeAsAny[MethodConfig]] = Field(
        default_factory=lambda: [_method(m) for m in ("bilinear", "bcsd", "qm", "local_regression", "dpdm")],
        description="registered method names or method configs",
    )
    ensemble_sizes: list[int] = Field(default_factory=lambda: [1, 16], description="diffusion ensemble sizes")
    train_years: tuple[int, int] = (1961, 2005)
    heldout_years: tuple[int, int] = (2011, 2020)
    month_stride: int = Field(
        1, ge=1, description="score every n-th held-out month (5: 24 of 120, all 12 calendar months)"
    )
    seed: int = Field(20261121, ge=0, description="base seed of the ensembles")
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads on CPU; default: torch's own choice"
    )
    output: str | None = Field(
        None, description="directory for tables and figures; default: <storage.root>/evaluate"
    )

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, v: Any) -> Any:
        return [_method(m) for m in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateConfig:
        for name in ("train_years", "heldout_years"):
            a, b = getattr(self, name)
            if b < a:
                raise ValueError(f"{name} ({a}, {b}) ends before it starts")
        (t0, t1), (h0, h1) = self.train_years, self.heldout_years
        if t0 <= h1 and h0 <= t1:
            raise ValueError(
                f"train_years ({t0}, {t1}) overlap heldout_years ({h0}, {h1}): baselines must never see held-out years"
            )
        if (
            any(f < 2 for f in self.factors)
            or len(set(self.factors)) != len(self.factors)
            or not self.factors
        ):
            raise ValueError(f"factors must be distinct integers >= 2, got {self.factors}")
        if (
            any(n < 1 for n in self.ensemble_sizes)
            or len(set(self.ensemble_sizes)) != len(self.ensemble_sizes)
            or not self.ensemble_sizes
        ):
            raise ValueError(f"ensemble_sizes must be distinct integers >= 1, got {self.ensemble_sizes}")
        names = [m.key for m in self.methods]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"methods must be a non-empty list without repeats, got {names}")
        if self.truth and self.truth_query:
            raise ValueError("give either truth (a path) or truth_query (a catalog search), not both")
        return self


_DATE_FORMATS = "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDTHH"


def date_parts(text: str) -> tuple[int, ...]:
    """``"2001-09-30"`` -> ``(2001, 9, 30)``: the (year, month, day, hour) fields a date string gives, in
    order, 1 to 4 of them (formats YYYY, YYYY-MM, YYYY-MM-DD, YYYY-MM-DDTHH; month 1..12, day 1..31,
    hour 0..23). ValueError naming the string otherwise."""
    s = str(text).strip()
    day_part, _, hour_part = s.partition("T")
    fields = day_part.split("-") + ([hour_part] if hour_part else [])
    limits = ((0, 99999), (1, 12), (1, 31), (0, 23))
    try:
        parts = tuple(int(f) for f in fields)
    except ValueError:
        parts = ()
    if (
        not 1 <= len(parts) <= 4
        or (hour_part and len(parts) != 4)
        or any(not lo <= v <= hi for v, (lo, hi) in zip(parts, limits, strict=False))
    ):
        raise ValueError(f"date {text!r} is not one of {_DATE_FORMATS} (month 1-12, day 1-31, hour 0-23)")
    return parts


def _not_after(start: tuple[int, ...], end: tuple[int, ...]) -> bool:
    """Whether the first instant of ``start`` lies within the inclusive ``end`` (any precisions)."""
    first = (start + (1, 1, 0)[len(start) - 1 :])[:4]
    return first[: len(end)] <= end


class TimeSelection(_Model):
    """Which time steps of a dataset to use: a window, then every ``every``-th step of it from ``offset``.

    ``years`` (inclusive calendar years) or ``dates`` (inclusive ``[start, end]``; each YYYY, YYYY-MM,
    YYYY-MM-DD or YYYY-MM-DDTHH, an end standing for the whole year/month/day/hour it names:
    ``("2001-01-01", "2001-09-30")`` is 1 January 00:00 to 30 September 23:59), not both; neither: every
    time step. ``every``/``offset`` then keep steps ``offset, offset + every, ...`` of the window.
    """

    years: tuple[int, int] | None = Field(None, description="inclusive calendar years (first, last)")
    dates: tuple[str, str] | None = Field(
        None, description="inclusive (start, end): YYYY-MM-DD, YYYY-MM or YYYY-MM-DDTHH"
    )
    every: int = Field(1, ge=1, description="keep every n-th time step of the window")
    offset: int = Field(0, ge=0, description="first time step of the window kept (0-based)")

    @field_validator("dates", mode="before")
    @classmethod
    def _yaml_dates(cls, v: Any) -> Any:
        """YAML reads an unquoted 2001-09-30 as a date: back to its string (a datetime keeps its hour)."""
        import datetime as dt

        def text(d: Any) -> Any:
            if isinstance(d, dt.datetime):
                return d.strftime("%Y-%m-%dT%H")
            return d.isoformat() if isinstance(d, dt.date) else str(d) if isinstance(d, int) else d

        return [text(d) for d in v] if isinstance(v, list | tuple) else v

    @model_validator(mode="after")
    def _window(self) -> TimeSelection:
        if self.years is not None and self.dates is not None:
            raise ValueError(f"give years {self.years} or dates {self.dates}, not both")
        if self.years is not None and self.years[1] < self.years[0]:
            raise ValueError(f"years {self.years} end before they start")
        if self.dates is not None:
            start, end = (date_parts(d) for d in self.dates)
            if not _not_after(start, end):
                raise ValueError(f"dates {self.dates} end before they start")
        return self

    def window(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """(start, end) as :func:`date_parts` tuples (inclusive), or None for every time step."""
        if self.years is not None:
            return (self.years[0],), (self.years[1],)
        if self.dates is not None:
            return date_parts(self.dates[0]), date_parts(self.dates[1])
        return None

    def overlaps(self, other: TimeSelection) -> bool:
        """Whether the windows of the two selections share any instant (``every``/``offset`` ignored;
        a selection without a window covers everything)."""
        a, b = self.window(), other.window()
        if a is None or b is None:
            return True
        return _not_after(a[0], b[1]) and _not_after(b[0], a[1])

    def describe(self) -> str:
        what = (
            f"years {self.years[0]}-{self.years[1]}"
            if self.years is not None
            else f"dates {self.dates[0]}..{self.dates[1]}"
            if self.dates is not None
            else "all times"
        )
        if self.every > 1 or self.offset:
            what += f", every {self.every} from step {self.offset}"
        return what


class FineVariable(_Model):
    """One variable of the fine data: where it is in the user's file, how it is transformed, its units."""

    source: str | None = Field(None, description="the variable's name in the file; default: the product name")
    transform: Literal["identity", "log1p"] | None = Field(
        None,
        description="network-space transform; default: by product name (pr: log1p), else identity",
    )
    units: str | None = Field(
        None, description="expected units, checked against the file's 'units' attribute when it has one"
    )


class FineDataConfig(_Model):
    """The user's own fine data (ERA5, a national analysis, gridded observations, regional model output).

    Where: ``path`` (a Zarr store, any fsspec URL; a local netCDF file; or a glob of local netCDF files),
    or ``query`` (an intake-esm search of ``catalog`` that must match exactly one dataset), not both.
    ``variables`` maps product names (tas, pr, ...) to :class:`FineVariable` specs; a list of names, a name
    mapped to nothing, or a name mapped to a string (the source name) are shorthands.

    ``mask``: the name of a mask variable in the data (nonzero/True = a valid cell); or ``"auto"``: a cell
    is valid where every variable is finite at every time; or None (default): ``"auto"`` when any value is
    missing, else every cell valid. Masked cells are NaN in every variable.

    ``domain`` says how a grid that does not tile a coarsening factor f is made to: ``"crop"`` removes the
    last ``n % f`` rows/columns at the north/east end; ``"pad"`` adds ``(-n) % f`` masked rows/columns at the
    north/east end. ``snap``: coordinates within ``snap`` x one cell of a regular grid are put exactly on it;
    farther ones are an error. ``time_step`` is inferred from the data (median spacing); give it only for a
    dataset with a single time step (default then: month) or to assert what the data must be.

    ``train``, ``validation`` and ``heldout`` select time steps (:class:`TimeSelection`); the windows of
    train and validation must not overlap heldout's (a selection of all times overlaps every other), and
    the actual time steps are checked again once the data are open.
    """

    path: str | None = Field(None, description="Zarr store (any URL), netCDF file, or glob of netCDF files")
    query: CatalogQuery | None = Field(None, description="catalog search giving exactly one dataset")
    catalog: str | None = Field(None, description="intake-esm JSON for query; default: the sample catalog")
    variables: dict[str, FineVariable] = Field(
        min_length=1, description="product name -> spec (a list of names means default specs)"
    )
    mask: str | None = Field(None, description='mask variable in the data, "auto", or None (auto if any NaN)')
    static: str | None = Field(
        None, description="static store (orog, orog_std, sftlf) on the fine grid, or a global one"
    )
    domain: Literal["crop", "pad"] = Field(
        "crop", description="make the grid tile the factor: crop or pad (masked) at the north/east end"
    )
    snap: float = Field(
        0.01, ge=0, lt=0.5, description="largest coordinate offset from a regular grid, in cells"
    )
    time_step: Literal["month", "day", "hour", "year"] | None = Field(
        None, description="default: inferred from the times (a single time step: month)"
    )
    train: TimeSelection = Field(description="time steps to train (and fit statistics) on")
    validation: TimeSelection | None = Field(None, description="time steps to validate on")
    heldout: TimeSelection = Field(description="time steps never trained on, for evaluation")

    @field_validator("variables", mode="before")
    @classmethod
    def _shorthands(cls, v: Any) -> Any:
        if isinstance(v, list | tuple):
            if len(set(map(str, v))) != len(v):
                raise ValueError(f"variables lists a name twice: {list(v)}")
            return {str(name): {} for name in v}
        if isinstance(v, dict):
            return {k: {} if s is None else {"source": s} if isinstance(s, str) else s for k, s in v.items()}
        return v

    @model_validator(mode="after")
    def _consistent(self) -> FineDataConfig:
        if (self.path is None) == (self.query is None):
            raise ValueError("give exactly one of path (a Zarr/netCDF location) or query (a catalog search)")
        if self.catalog is not None and self.query is None:
            raise ValueError("catalog is only used with query; remove it or give a query instead of path")
        sources = self.sources()
        repeated = sorted({s for s in sources.values() if list(sources.values()).count(s) > 1})
        if repeated:
            raise ValueError(f"variables: source(s) {repeated} used by more than one product")
        if self.mask not in (None, "auto") and self.mask in sources.values():
            raise ValueError(f"mask {self.mask!r} is one of the variables; name a separate mask variable")
        for name in ("train", "validation"):
            sel = getattr(self, name)
            if sel is not None and sel.overlaps(self.heldout):
                raise ValueError(
                    f"{name} ({sel.describe()}) overlaps heldout ({self.heldout.describe()}): held-out "
                    "times must never be trained on"
                )
        return self

    def sources(self) -> dict[str, str]:
        """Product name -> the variable's name in the data."""
        return {name: spec.source or name for name, spec in self.variables.items()}


class ClimReconConfig(_Model):
    data_home: str = Field(default_factory=lambda: str(default_data_home()))
    storage: StorageConfig = StorageConfig()
    sample: SampleCatalogConfig = SampleCatalogConfig()
    ingest: IngestConfig = IngestConfig()
    regrid: RegridConfig = RegridConfig()
    method: SerializeAsAny[MethodConfig] = Field(
        default_factory=lambda: _method("dpdm"), description="the method train, downscale and reconstruct use"
    )
    sampler: SamplerConfig = SamplerConfig()
    train: TrainSection = TrainSection()
    downscale: DownscaleConfig = DownscaleConfig()
    aggregate: AggregateConfig = AggregateConfig()
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    data: FineDataConfig | None = Field(
        None,
        description="the user's own fine data (path or catalog query, variables, mask, time splits); "
        "see climrecon.tasks.fine_data",
    )

    @field_validator("method", mode="before")
    @classmethod
    def _the_method(cls, v: Any) -> Any:
        return _method(v)

    @model_validator(mode="after")
    def _patch_fits_factor(self) -> ClimReconConfig:
        patch = getattr(self.method, "patch_size", None)
        if patch and patch % self.train.factor:
            raise ValueError(
                f"method.patch_size ({patch}) must be a multiple of train.factor ({self.train.factor})"
            )
        return self

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> ClimReconConfig:
        """This config with ``dotted.key=value`` overrides applied, validated again."""
        if not overrides:
            return self
        raw = apply_overrides(self.model_dump(mode="json"), list(overrides))
        try:
            return ClimReconConfig.model_validate(raw)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, "overrides")) from None

    def sample_dir(self) -> Path:
        return Path(self.sample.directory or Path(self.data_home) / "sample")

    def sample_catalog(self) -> Path:
        return self.sample_dir() / "catalog.json"

    def train_variables(self) -> list[str]:
        """What ``climrecon train`` learns: ``train.variables``, else every variable of ``data:``, else
        tas, uas, vas."""
        if self.train.variables:
            return list(self.train.variables)
        return list(self.data.variables) if self.data is not None else ["tas", "uas", "vas"]

    def evaluate_variables(self) -> list[str]:
        """What the evaluation scores: ``evaluate.variables``, else every variable of ``data:``, else tas,
        uas, vas, pr."""
        if self.evaluate.variables:
            return list(self.evaluate.variables)
        return list(self.data.variables) if self.data is not None else ["tas", "uas", "vas", "pr"]


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``dotted.key=value`` overrides set (values parsed as YAML)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if nxt is None:  # an optional section not given yet (e.g. data:): start it
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(value)
    return out


# Sections a file replaces whole rather than merging into the defaults: a catalog query written in a
# file means exactly that query, not the default one with some columns changed.
ATOMIC_SECTIONS = frozenset({"query"})


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` laid over ``base``: mappings merge key by key (except ATOMIC_SECTIONS), anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        mergeable = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ATOMIC_SECTIONS
        out[k] = _deep_merge(out[k], v) if mergeable else v
    return out


MOVED_KEYS = {
    **{
        f"{section}.{key}": f"sampler.{key}"
        for section in ("downscale", "evaluate")
        for key in ("num_steps", "blend", "overlap", "max_patches_per_batch", "device")
    },
    "downscale.checkpoint": "method.checkpoint",
    "evaluate.checkpoint": "method.checkpoint (or a method entry {name: dpdm, checkpoint: ...} in evaluate.methods)",
    **{f"train.{key}": f"method.{key}" for key in ("target", "static_coarse", "patch_size")},
    **{
        f"train.{key}": f"method.network.{key}"
        for key in (
            "base_channels",
            "channel_mults",
            "num_blocks",
            "attention_levels",
            "mid_attention",
            "dropout",
            "time_harmonics",
        )
    },
    **{f"train.{key}": f"method.edm.{key}" for key in ("sigma_data", "P_mean", "P_std")},
}
"""Keys of earlier releases -> where they live now (named in the error a stale config gets)."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key (not allowed here)" if e["type"] == "extra_forbidden" else e["msg"]
        if loc in MOVED_KEYS:
            msg = f"moved to {MOVED_KEYS[loc]}"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def resolve_config(
    config: ClimReconConfig | dict | None,
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> ClimReconConfig:
    """``config`` (already validated; what the CLI hands a flow, so that no raw ``--set`` string ever
    becomes a Prefect parameter), else :func:`load_config` of ``path`` and ``overrides``."""
    if config is None:
        return load_config(path, overrides)
    if isinstance(config, dict):  # a deployment's parameters arrive as JSON
        try:
            config = ClimReconConfig.model_validate(config)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, "flow parameter 'config'")) from None
    return config.with_overrides(list(overrides or ()))


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ClimReconConfig:
    """Load and validate a config; ``path=None`` gives the embedded defaults (plus overrides)."""
    source = str(path) if path else "embedded defaults"
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(
                f"config file {p} must hold a mapping at the top level, not {type(raw).__name__}"
            )
    # Defaults first, then the file, then overrides: setting one key of a section keeps the others.
    defaults = ClimReconConfig().model_dump(mode="json")
    defaults["method"] = {"name": defaults["method"]["name"]}  # a method's own defaults come with its name
    raw = apply_overrides(_deep_merge(defaults, raw), overrides)
    try:
        return ClimReconConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
