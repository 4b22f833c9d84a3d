"""Perfect-model training data for conditional patch diffusion: fine truth -> (target, conditioning) pairs.

Pipeline (one home for it; training, evaluation and the shipped-checkpoint tests all use it):

1. :func:`open_truth` opens a fine truth Zarr (the synthetic reanalysis, or ERA5 monthly means with the same
   schema: ``(time, lat, lon)`` float32 variables, cftime months) and :func:`select_years` picks whole years,
   failing when a requested year is not in the store.
2. :func:`perfect_model_pairs` coarsens the truth by ``factor`` (area means), puts it back on the fine grid
   (bilinear, edges clamped) and stacks it with the static fields (``static_on_grid`` on the truth's grid)
   and position: the conditioning of :func:`climrecon.methods.features.conditioning_stack`.
3. The network target is either the fine field itself (``target="full"``) or, by default, its RESIDUAL over
   the bilinear coarse input, ``truth - <var>_coarse`` (``target="residual"``, :func:`residual_target`):
   the model then only generates the fine-scale detail the coarse field lacks, and large-scale errors
   cannot creep in; physical fields come back with
   :func:`climrecon.tasks.downscale.physical_fields` (output + ``<var>_coarse``).
   :func:`fit_target_normalization` computes the target statistics on the TRAINING years only, and so do
   the conditioning statistics (the full fields' statistics, whatever the target);
   :func:`climrecon.methods.features.normalize_conditioning` maps the conditioning to network space with
   the conditioning statistics.
4. :class:`PatchBatches` draws random ``patch_size`` crops and months: the batch of step ``k`` depends only
   on ``seed_for(seed, k)``, so ``batches(first_step)`` resumes exactly (see :mod:`climrecon.models.trainer`).

Memory: everything is held in memory as float32. For the default setup (80 x 80 cells, 45 training years,
3 variables) that is ~33 MB of targets plus ~33 MB of time-varying conditioning; static and position channels
are stored once, not per month.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr

from climrecon.catalogs.static import open_static_fields
from climrecon.methods.features import (
    TARGET_KINDS,
    Climatology,
    ConditioningSpec,
    coarse_on_fine,
    conditioning_stack,
    normalize_conditioning,
    perfect_model_coarse,
    residual_climatology,
    time_of_year,
    with_coarse_static,
)
from climrecon.models.normalization import DEFAULT_TRANSFORMS, NormalizationStats
from climrecon.models.samplers import seed_for
from climrecon.models.trainer import Batch
from climrecon.storage import url_options
from climrecon.tasks.grids import Grid
from climrecon.tasks.regrid import static_on_grid

__all__ = [
    "TrainingDataError",
    "TrainingSetup",
    "default_truth_url",
    "default_static_url",
    "training_setup",
    "TrainingSource",
    "training_source",
    "time_stamps",
    "seen_periods",
    "open_truth",
    "select_years",
    "static_for_truth",
    "perfect_model_pairs",
    "training_climatology",
    "valid_cells",
    "fit_target_normalization",
    "TARGET_KINDS",
    "residual_target",
    "PatchBatches",
    "window_starts",
    "consecutive_steps",
]


class TrainingDataError(ValueError):
    """The truth store cannot provide the requested training data (missing variable or years)."""


def open_truth(
    url: str, variables: Sequence[str], storage_options: dict[str, Any] | None = None
) -> xr.Dataset:
    """Lazily open a fine truth store with cftime times; raises naming the store if a variable is missing."""
    try:
        ds = xr.open_zarr(
            str(url),
            storage_options=url_options(str(url), storage_options),
            decode_times=xr.coders.CFDatetimeCoder(use_cftime=True),
        )
    except (FileNotFoundError, KeyError) as exc:
        raise TrainingDataError(f"no truth store at {url} ({type(exc).__name__}: {exc})") from None
    missing = [v for v in variables if v not in ds.data_vars]
    if missing:
        raise TrainingDataError(
            f"truth store {url} lacks variable(s) {missing}; it has {sorted(map(str, ds.data_vars))}"
        )
    return ds[list(variables)]


def select_years(ds: xr.Dataset, years: tuple[int, int], name: str = "truth") -> xr.Dataset:
    """The months of the inclusive year range ``years``; every one of those years must be in ``ds``."""
    first, last = int(years[0]), int(years[1])
    have = np.array([t.year for t in ds["time"].values])
    missing = sorted(set(range(first, last + 1)) - set(have.tolist()))
    if missing:
        span = f"{have.min()}-{have.max()}" if have.size else "no times"
        raise TrainingDataError(
            f"{name}: years {first}-{last} requested but {len(missing)} of them ({missing[0]}..{missing[-1]}) "
            f"are not in the store (it covers {span}); change the year range in the train config"
        )
    return ds.isel(time=np.flatnonzero((have >= first) & (have <= last)))


def static_for_truth(
    static_url: str, truth: xr.Dataset, storage_options: dict[str, Any] | None = None
) -> xr.Dataset:
    """orog, orog_std, sftlf on the truth's grid from a global static store."""
    static = open_static_fields(static_url, storage_options)
    grid = Grid.from_dataset(truth, "truth")
    lat, lon = grid.lat, grid.lon
    pad = 1.0  # degrees around the domain, enough for interpolation / aggregation stencils
    sub = static.sel(lat=slice(lat.min() - pad, lat.max() + pad), lon=slice(lon.min() - pad, lon.max() + pad))
    return static_on_grid(sub.load(), grid, name=f"static store {static_url}")


def _pairs_fields(
    truth: xr.Dataset, spec: ConditioningSpec, first_guess: Any = None
) -> tuple[xr.Dataset, xr.Dataset, Grid]:
    """(target loaded as float32, its coarse view bilinearly back on the fine grid, the fine grid); with a
    ``first_guess`` (see :func:`training_setup`), that model fitted on the pairs and its predicted residual
    added to the coarse-on-fine fields."""
    target = truth[list(spec.variables)].astype("float32").load()
    grid = Grid.from_dataset(target, "truth")
    if grid.nlat % spec.factor or grid.nlon % spec.factor:
        raise TrainingDataError(
            f"truth grid {grid.describe()} is not a whole number of {spec.factor} x {spec.factor} coarse cells"
        )
    coarse = perfect_model_coarse(target, spec.factor)
    coarse_fine = coarse_on_fine(coarse, grid)
    if first_guess is not None:
        coarse_fine = first_guess.fit(coarse, target).first_guess(coarse_fine, coarse, spec.variables)
    return target, coarse_fine, grid


def training_climatology(truth: xr.Dataset, spec: ConditioningSpec) -> Climatology:
    """The residual climatology (:func:`~climrecon.methods.features.residual_climatology`) of the
    perfect-model pairs of ``truth`` (pass the TRAINING times only)."""
    target, coarse_fine, _ = _pairs_fields(truth, spec)
    return residual_climatology(target, coarse_fine, spec.variables)


def perfect_model_pairs(
    truth: xr.Dataset,
    static_fine: xr.Dataset,
    spec: ConditioningSpec,
    climatology: Climatology | None = None,
) -> tuple[xr.Dataset, xr.DataArray]:
    """(target, conditioning) in physical units from fine truth: target = truth[spec.variables] (loaded,
    float32); conditioning = :func:`conditioning_stack` of the truth coarsened by ``spec.factor`` and
    bilinearly put back on the fine grid, with ``static_fine`` (time, channel, lat, lon) and, for
    ``spec.static_coarse``, the static fields' views through the same coarse blocks; ``climatology``
    (from :func:`training_climatology` of the training times) when ``spec.climatology``."""
    return _stacked(_pairs_fields(truth, spec), static_fine, spec, climatology)


def _stacked(
    fields: tuple[xr.Dataset, xr.Dataset, Grid],
    static_fine: xr.Dataset,
    spec: ConditioningSpec,
    climatology: Climatology | None,
) -> tuple[xr.Dataset, xr.DataArray]:
    """(target, conditioning) of :func:`_pairs_fields`' output (see :func:`perfect_model_pairs`)."""
    target, coarse_fine, grid = fields
    # the coarse grid's view of the static fields: through the same blocks as the truth
    static_fine = with_coarse_static(static_fine, grid.coarsened(spec.factor), spec.static_coarse)
    return target, conditioning_stack(coarse_fine, static_fine, spec, climatology)


def valid_cells(target: xr.Dataset, variables: Sequence[str]) -> np.ndarray | None:
    """[lat, lon] bool: cells where every variable is finite at every time; None when all are (no mask).
    Cells missing at only some times are masked entirely (a static mask, like a land-sea mask)."""
    ok = np.ones((target.sizes["lat"], target.sizes["lon"]), bool)
    for v in variables:
        ok &= np.isfinite(target[v].transpose(..., "lat", "lon").values).all(
            axis=tuple(range(target[v].ndim - 2))
        )
    if not ok.any():
        raise TrainingDataError(f"no cell of the truth is valid (finite at every time) for {list(variables)}")
    return None if ok.all() else ok


def _coarse(cond: xr.DataArray, variable: str) -> xr.DataArray:
    return cond.sel(channel=f"{variable}_coarse", drop=True)


def residual_target(target: xr.Dataset, cond: xr.DataArray, variables: Sequence[str]) -> xr.Dataset:
    """``truth - <var>_coarse`` per variable (physical units): what a ``target="residual"`` model generates."""
    return xr.Dataset({v: (target[v] - _coarse(cond, v)).astype("float32") for v in variables})


def fit_target_normalization(
    train_target: xr.Dataset, variables: Sequence[str], transforms: dict[str, str] | None = None
) -> NormalizationStats:
    """Statistics of the TRAINING-time targets (pass only training times), one entry per variable, after
    each variable's transform (``transforms``, default by name: log1p for pr); NaN cells ignored."""
    return NormalizationStats.fit({v: train_target[v].values for v in variables}, transforms or None)


@dataclass
class PatchBatches:
    """Random-crop batches of normalised (target, conditioning, time of year), deterministic by step.

    ``target`` [T, V, H, W], ``cond_dynamic`` [T, Cd, H, W] (the coarse channels), ``cond_static``
    [Cs, H, W] (static + position, identical every month), all in network space; ``time_of_year`` [T];
    ``years`` [T] the calendar year of each month (kept to prove which years a batch can touch).
    The conditioning of a batch is ``cat(cond_dynamic, cond_static)``, the channel order of the spec.
    """

    target: np.ndarray
    cond_dynamic: np.ndarray
    cond_static: np.ndarray
    time_of_year: np.ndarray
    years: np.ndarray
    patch_size: int
    batch_size: int
    seed: int = 0
    valid: np.ndarray | None = None  # [H, W] bool: cells that count in the loss (None: all)
    window: int = 1  # consecutive time steps per target (a window prior): channels time-major, k * V
    consecutive: np.ndarray | None = None  # [T] bool: step i follows step i - 1 (None: all do)

    def __post_init__(self) -> None:
        t, _, h, w = self.target.shape
        if self.patch_size > min(h, w):
            raise TrainingDataError(f"patch_size {self.patch_size} exceeds the domain ({h} x {w} cells)")
        if self.cond_dynamic.shape[0] != t or self.time_of_year.shape != (t,) or self.years.shape != (t,):
            raise TrainingDataError("target, cond_dynamic, time_of_year and years must share the time axis")
        if self.window < 1 or self.window % 2 == 0:
            raise TrainingDataError(f"a window is an odd number of time steps, got {self.window}")
        if self.window > 1 and self.cond_dynamic.shape[1]:
            raise TrainingDataError(
                "a window prior is conditioned on static fields, position and time only (no coarse planes)"
            )
        self.starts = window_starts(self.consecutive, t, self.window)
        if not len(self.starts):
            raise TrainingDataError(
                f"no run of {self.window} consecutive time steps in the {t} training steps: shorten the window"
            )

    @classmethod
    def from_pairs(
        cls,
        target: xr.Dataset,
        cond: xr.DataArray,
        spec: ConditioningSpec,
        stats: NormalizationStats,
        *,
        patch_size: int,
        batch_size: int,
        seed: int = 0,
        cond_stats: NormalizationStats | None = None,
        clim_scale: dict[str, float] | None = None,
        valid: np.ndarray | None = None,
        time_step: str = "month",
        window: int = 1,
    ) -> PatchBatches:
        """``target`` holds what the network generates (full fields or residuals) and ``stats`` its
        statistics; ``cond_stats`` (default ``stats``) normalise the coarse channels (full-field stats),
        ``clim_scale`` the climatology channels; ``valid`` [H, W] marks the cells that count (the target is
        set to 0 elsewhere, and the batches carry the mask as their loss weight); ``window``: targets of that
        many consecutive time steps (only windows inside one unbroken run of the time axis)."""
        names = spec.channel_names()
        z_target = stats.normalize(np.stack([target[v].values for v in spec.variables], axis=1))
        if valid is not None:
            z_target = np.where(valid, np.nan_to_num(z_target, nan=0.0), 0.0)
        z_cond = normalize_conditioning(cond.values, names, cond_stats or stats, clim_scale)
        nd = spec.n_dynamic()
        return cls(
            target=np.ascontiguousarray(z_target, dtype=np.float32),
            cond_dynamic=np.ascontiguousarray(z_cond[:, :nd]),
            cond_static=np.ascontiguousarray(z_cond[0, nd:]),
            time_of_year=time_of_year(target["time"].values, time_step),
            years=np.array([t.year for t in target["time"].values]),
            patch_size=patch_size,
            batch_size=batch_size,
            seed=seed,
            valid=None if valid is None else np.ascontiguousarray(valid, dtype=bool),
            window=window,
            consecutive=consecutive_steps(target["time"].values, time_step),
        )

    def draw(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(time indices, crop rows, crop cols) of the batch of ``step``, from ``seed_for(seed, step)``."""
        rng = np.random.default_rng(seed_for(self.seed, step))
        _, _, h, w = self.target.shape
        idx = self.starts[rng.integers(0, len(self.starts), self.batch_size)]
        rows = rng.integers(0, h - self.patch_size + 1, self.batch_size)
        cols = rng.integers(0, w - self.patch_size + 1, self.batch_size)
        return idx, rows, cols

    def batch(self, step: int) -> Batch:
        idx, rows, cols = self.draw(step)
        p, k = self.patch_size, self.window
        tgt, cnd = [], []
        for i, r, c in zip(idx, rows, cols, strict=True):
            # a window is a view of k consecutive steps, stacked time-major along channels (k * V)
            tgt.append(self.target[i : i + k, :, r : r + p, c : c + p].reshape(-1, p, p))
            cnd.append(
                np.concatenate(
                    [self.cond_dynamic[i, :, r : r + p, c : c + p], self.cond_static[:, r : r + p, c : c + p]]
                )
            )
        weight = None
        if self.valid is not None:
            w = [self.valid[r : r + p, c : c + p] for r, c in zip(rows, cols, strict=True)]
            weight = torch.from_numpy(np.stack(w)[:, None].astype(np.float32))
        return Batch(
            target=torch.from_numpy(np.stack(tgt)),
            cond=torch.from_numpy(np.stack(cnd)),
            time_of_year=torch.from_numpy(self.time_of_year[idx + k // 2]),  # the window's centre
            weight=weight,
        )

    def __call__(self, first_step: int) -> Iterator[Batch]:
        """The infinite batch stream of a run that has completed ``first_step`` steps."""
        step = first_step
        while True:
            yield self.batch(step)
            step += 1


def window_starts(consecutive: np.ndarray | None, n: int, window: int) -> np.ndarray:
    """First steps ``i`` of every window ``i .. i + window - 1`` of ``n`` steps that crosses no gap
    (``consecutive[j]``: step j follows step j - 1; None: no gaps)."""
    if window > n:
        return np.zeros(0, np.int64)
    if consecutive is None or window == 1:
        return np.arange(n - window + 1)
    breaks = np.concatenate([[0], np.cumsum(~np.asarray(consecutive[1:], bool))])  # run id of each step
    starts = np.arange(n - window + 1)
    return starts[breaks[starts] == breaks[starts + window - 1]]


def consecutive_steps(times: np.ndarray, time_step: str) -> np.ndarray:
    """[T] bool: time step i is the one right after step i - 1 (False at a gap between selections)."""
    times = np.asarray(times)
    if len(times) < 2:
        return np.zeros(len(times), bool)
    if time_step in ("month", "year"):
        months = np.array([t.year * 12 + t.month - 1 for t in times])
        gaps = np.diff(months) == (12 if time_step == "year" else 1)
    else:  # days, hours: the calendar's own differences
        seconds = np.array([(b - a).total_seconds() for a, b in zip(times[:-1], times[1:], strict=True)])
        gaps = seconds == seconds.min()
    return np.concatenate([[False], gaps])


# -- where the training data live, and one training run's data -----------------------------------------------
def _catalog_path(cfg: Any, source_id: str) -> str:
    import pandas as pd

    csv = cfg.sample_dir() / "catalog.csv"
    if not csv.is_file():
        raise FileNotFoundError(
            f"no sample catalog at {csv}; run `climrecon catalog build-sample` or set train.truth/train.static"
        )
    rows = pd.read_csv(csv)
    paths = rows.loc[rows["source_id"] == source_id, "path"].unique()
    if len(paths) != 1:
        raise FileNotFoundError(
            f"sample catalog {csv} lists {len(paths)} store(s) for source_id {source_id!r}"
        )
    return str(paths[0]).removeprefix("file://")


def default_truth_url(cfg: Any) -> str:
    """``train.truth``, or the synthetic reanalysis of the sample catalog (``cfg``: a ClimReconConfig)."""
    from climrecon.catalogs.sample import SYNTHETIC_SOURCE_ID

    return cfg.train.truth or _catalog_path(cfg, SYNTHETIC_SOURCE_ID)


def default_static_url(cfg: Any) -> str:
    """``train.static``, or the global static store of the sample catalog."""
    from climrecon.catalogs.sample import STATIC_SOURCE_ID

    return cfg.train.static or _catalog_path(cfg, STATIC_SOURCE_ID)


@dataclass
class TrainingSetup:
    """One training run's data: the crop sampler, statistics, conditioning layout, grid, labelled description."""

    batches: PatchBatches
    stats: NormalizationStats  # of what the network generates (residuals or full fields)
    cond_stats: NormalizationStats  # full-field statistics, for the coarse conditioning channels
    spec: ConditioningSpec
    grid: Grid
    data: dict[str, Any]  # labelled description of the training data (goes into the checkpoint)
    climatology: Climatology | None = None  # training-period residual climatology (spec.climatology)
    first_guess: Any = None  # the fitted first guess (training_setup's first_guess), if any

    def arrays(self) -> dict[str, torch.Tensor]:
        """What the checkpoint stores beside the weights (the climatology and the first guess, if any)."""
        out = self.climatology.arrays() if self.climatology is not None else {}
        if self.first_guess is not None:
            out.update(self.first_guess.to_checkpoint()[0])
        return out


def time_stamps(times: Any) -> list[int]:
    """Each cftime label as the integer ``YYYYMMDDHH`` (what a checkpoint records of the times it saw)."""
    return [
        int(t.year) * 1_000_000 + t.month * 10_000 + t.day * 100 + t.hour for t in np.asarray(times).ravel()
    ]


def seen_periods(all_times: Any, seen: Any) -> list[list[int]]:
    """The ``seen`` labels as runs ``[first, last]`` (``YYYYMMDDHH``, inclusive) of consecutive steps of the
    source's own time axis ``all_times``: compact (one run per contiguous block), and exact for any label of
    that axis (a label lies in a run iff it was seen)."""
    axis = time_stamps(all_times)
    wanted = set(time_stamps(seen))
    runs: list[list[int]] = []
    open_run = False
    for t in axis:
        if t in wanted:
            if open_run:
                runs[-1][1] = t
            else:
                runs.append([t, t])
                open_run = True
        else:
            open_run = False
    return runs


@dataclass
class TrainingSource:
    """The fine truth of one training run: the TRAINING times only (lazy, the variables to learn), the static
    fields on its grid, its time step and transforms, and a JSON description for the checkpoint."""

    truth: xr.Dataset
    static: xr.Dataset
    time_step: str
    transforms: dict[str, str]
    description: dict[str, Any]


def training_source(cfg: Any, variables: Sequence[str], factor: int) -> TrainingSource:
    """Where ``climrecon train`` reads its data (``cfg``: a ClimReconConfig): the ``data:`` section (the
    user's own fine data: any file, names, time step, mask, splits; :mod:`climrecon.tasks.fine_data`), cropped
    or padded to tile ``factor``, else ``train.truth`` / ``train.static`` and ``train.train_years`` (the
    sample's synthetic reanalysis by default). Held-out times are never opened for training."""
    from climrecon.storage import public_url

    if cfg.data is None:
        truth_url, static_url = default_truth_url(cfg), default_static_url(cfg)
        section = cfg.train
        store = open_truth(truth_url, variables)
        truth = select_years(store, section.train_years, f"truth store {truth_url}")
        years = np.array([t.year for t in store["time"].values])
        v0, v1 = section.validation_years  # recorded as seen where the store has them; none need be there
        validation = store.isel(time=np.flatnonzero((years >= v0) & (years <= v1)))
        description = {
            "truth": public_url(truth_url),
            "truth_title": store.attrs.get("title", ""),
            "synthetic": str(store.attrs.get("synthetic", "false")).lower() == "true",
            "static": public_url(static_url),
            "train_years": list(section.train_years),
            "validation_years": list(section.validation_years),
            "heldout_years": list(section.heldout_years),
            "seen_periods": seen_periods(
                store["time"].values, np.concatenate([truth["time"].values, validation["time"].values])
            ),
        }
        transforms = {v: DEFAULT_TRANSFORMS.get(v, "identity") for v in variables}
        return TrainingSource(truth, static_for_truth(static_url, truth), "month", transforms, description)

    from climrecon.tasks.fine_data import FineDataError, fine_static, open_fine_data

    data = cfg.data
    try:
        fine = open_fine_data(data).for_factor(factor)
        missing = [v for v in variables if v not in fine.variables]
        if missing:
            raise TrainingDataError(
                f"train.variables {missing} are not among the fine data's variables {fine.variables} "
                "(data.variables)"
            )
        splits = fine.splits(data)
        static = fine_static(fine, data.static or default_static_url(cfg))
    except FineDataError as exc:
        raise TrainingDataError(str(exc)) from None
    truth = splits["train"][list(variables)]
    seen = [truth["time"].values] + ([splits["validation"]["time"].values] if "validation" in splits else [])
    description = {
        "truth": fine.source.get("url", fine.source.get("path", "")),
        "fine_data": fine.source,
        "static": public_url(data.static) if data.static else public_url(default_static_url(cfg)),
        "train": data.train.describe(),
        "validation": data.validation.describe() if data.validation else None,
        "heldout": data.heldout.describe(),
        "time_step": fine.time_step,
        "seen_periods": seen_periods(fine.ds["time"].values, np.concatenate(seen)),
    }
    transforms = {v: fine.transforms[v] for v in variables}
    return TrainingSource(truth, static, fine.time_step, transforms, description)


def training_setup(
    section: Any,
    spec: ConditioningSpec,
    source: TrainingSource,
    *,
    target: str = "residual",
    patch_size: int = 32,
    window: int = 1,
    first_guess: Any = None,
) -> TrainingSetup:
    """Training-time pairs of ``source`` (``section``: a TrainSection, for the batch size and seed), their
    statistics and the crop sampler; held-out times are never opened.

    ``first_guess`` (optional, unfitted): a model with ``fit(coarse, fine)`` -> itself,
    ``first_guess(coarse_fine, coarse, variables)`` -> the coarse-on-fine fields it improves and
    ``to_checkpoint()`` -> (arrays, description), e.g.
    :class:`climrecon.methods.local_regression.LocalRegression`. It is fitted on the training pairs (coarse =
    the truth's block means) and its predicted fine-minus-bilinear residual is added to the ``<var>_coarse``
    fields: the network is conditioned on, and a residual target is taken from, the first guess instead of
    the bilinear field. Cells it leaves NaN (never valid) keep the bilinear value."""
    if target not in TARGET_KINDS:
        raise TrainingDataError(f"target must be one of {TARGET_KINDS}, got {target!r}")
    if target == "residual":
        logs = [v for v in spec.variables if source.transforms.get(v) == "log1p"]
        if logs:
            raise TrainingDataError(
                f"variables {logs} are log1p-transformed; a residual target (truth minus the coarse input) is "
                "not: use target: full, or CorrDiff (its network space transforms the full fields)"
            )
    truth = source.truth
    # coarsened once, for the first guess, the climatology and the conditioning
    fields = _pairs_fields(truth, spec, first_guess)
    climatology = residual_climatology(fields[0], fields[1], spec.variables) if spec.climatology else None
    clim_scale = dict(zip(spec.variables, climatology.scale, strict=True)) if climatology else None
    pairs, cond = _stacked(fields, source.static, spec, climatology)
    valid = valid_cells(pairs, spec.variables)
    cond_stats = fit_target_normalization(pairs, spec.variables, source.transforms)
    if target == "residual":
        pairs = residual_target(pairs, cond, spec.variables)
    stats = fit_target_normalization(pairs, spec.variables, source.transforms)
    batches = PatchBatches.from_pairs(
        pairs,
        cond,
        spec,
        stats,
        patch_size=patch_size,
        batch_size=section.batch_size,
        seed=section.seed,
        cond_stats=cond_stats,
        clim_scale=clim_scale,
        valid=valid,
        time_step=source.time_step,
        window=window,
    )
    data = {
        **source.description,
        "months": int(pairs.sizes["time"]),
        "time_steps": int(pairs.sizes["time"]),
        "time_step": source.time_step,
        "conditioning": "perfect model: truth coarsened by area means, bilinear back to the fine grid",
        "target": target,
        "conditioning_normalization": cond_stats.to_dict(),
    }
    if window > 1:
        data["window"] = window
    if climatology is not None:
        data["climatology"] = climatology.describe()
    if first_guess is not None:
        data["first_guess"] = first_guess.to_checkpoint()[1]
    if valid is not None:
        data["masked_cells"] = int((~valid).sum())
    grid = Grid.from_dataset(truth, "truth")
    return TrainingSetup(batches, stats, cond_stats, spec, grid, data, climatology, first_guess)
