"""Classical downscaling baselines, methods of the registry like the diffusion models (:mod:`.base`).

Contract (:class:`~climrecon.methods.base.Method`):
- ``fit(coarse_train, fine_train)`` learns from training years only (whatever is passed in) and returns
  the fitted method; ``downscale(inputs, members=1, seed=0)`` returns an ``xr.Dataset`` on ``inputs.grid``
  with dims ``(member, time, lat, lon)``, float32, one variable per gridded variable of ``inputs.coarse``,
  units and ``time``/``time_bnds`` kept. The baselines are deterministic: their members are identical
  copies and ``seed`` is accepted for the shared signature; static fields are unused by them.
- Variables in :data:`MULTIPLICATIVE_VARIABLES` (pr) are corrected by ratios, all others (tas, uas, vas,
  psl) by differences.

Baselines: :class:`BilinearDownscaler` (regrid.bilinear); :class:`DeltaDownscaler` (bilinear plus the
training period's mean fine-minus-bilinear residual per fine cell and calendar month, a ratio for pr);
:class:`QuantileMappingDownscaler` (bilinear, then empirical quantile mapping per month of year and fine
cell); :class:`BCSDDownscaler` (Wood et al. 2004: quantile mapping on the coarse grid against the coarsened
reference, then spatial disaggregation of the bias-corrected anomaly onto the fine-scale climatology).

Short records: a calendar month with too few training values (delta: ``min_values``; quantile mapping: 2)
pools a cyclic window of neighbouring calendar months (+-1, +-2, ... at most +-6, the whole year) until it
has enough (:func:`month_windows`; the windows used are kept in ``pooled_months``). A month with enough
values uses only its own, so records with >= 2 values in every month give the results they always gave.
Months absent from the training data are never fitted (downscaling them raises :class:`BaselineError`):
pooling fills thin months, it does not invent a climate for months never seen.

Missing cells (NaN in the fine truth, e.g. ocean of a land-only dataset): the fitted baselines skip them
when fitting and give NaN there; a NaN coarse value (a coarse cell with no valid fine cell) is left out of
the bilinear stencils around it (:func:`_bilinear_skipna`) rather than spreading NaN to valid fine cells.

Quantile mapping is :class:`EmpiricalQuantileMapping`, written here rather than taken from xsdba: xsdba 0.7
would add numba, llvmlite, pint and cf_xarray to the stack and, measured on this 2-core machine, took 13 s
to import and 14 s (JIT) to adjust a 240 x 4 x 5 toy case, for what is ~40 lines of vectorised NumPy here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import xarray as xr
from pydantic import Field

from climrecon.methods.base import Inputs, MethodConfig, MethodError, Needs, gridded_variables, member_indices
from climrecon.tasks import regrid
from climrecon.tasks.grids import Grid, GridError

__all__ = [
    "BaselineError",
    "MULTIPLICATIVE_VARIABLES",
    "GridLike",
    "BilinearConfig",
    "DeltaConfig",
    "QuantileMappingConfig",
    "BCSDConfig",
    "EmpiricalQuantileMapping",
    "BilinearDownscaler",
    "DeltaDownscaler",
    "QuantileMappingDownscaler",
    "BCSDDownscaler",
    "month_windows",
]

MULTIPLICATIVE_VARIABLES = frozenset({"pr"})
POOL_LIMIT = 6  # widest window of neighbouring calendar months a thin month may pool: +-6 is the whole year
GridLike = Grid | xr.Dataset | xr.DataArray


class BaselineError(MethodError):
    """A baseline cannot fit or downscale the data as given; the message names the variable/grid at fault."""


# -- shared helpers ----------------------------------------------------------------------------------------
def _as_grid(target: GridLike, what: str) -> Grid:
    try:
        return target if isinstance(target, Grid) else Grid.from_dataset(target, what)
    except GridError as err:
        raise BaselineError(f"{what}: not a regular lat/lon grid ({err})") from err


def _same_grid(a: Grid, b: Grid) -> bool:
    """Same cells, longitudes compared modulo 360."""
    return a.same_cells(b)


def _common_variables(coarse: xr.Dataset, fine: xr.Dataset, where: str) -> list[Hashable]:
    names = [v for v in gridded_variables(coarse) if v in fine.data_vars]
    if not names:
        raise BaselineError(
            f"{where}: coarse variables {sorted(map(str, gridded_variables(coarse)))} and fine variables "
            f"{sorted(map(str, gridded_variables(fine)))} have none in common"
        )
    return names


def _bilinear(ds: xr.Dataset, target: GridLike) -> xr.Dataset:
    return regrid.bilinear(ds, target if isinstance(target, Grid) else _as_grid(target, "target grid"))


def _bilinear_skipna(ds: xr.Dataset, target: GridLike) -> xr.Dataset:
    """:func:`_bilinear` with NaN source values left out of the stencil instead of spreading.

    Where every source value a target value draws on is valid, this IS ``_bilinear`` (the same bytes), so
    complete data give what they always gave. Where some are NaN (a coarse cell with no valid fine cell:
    ocean of a land-only truth), the target is the bilinear weighted mean of the valid ones, weights
    renormalised: ``bilinear(x filled with 0) / bilinear(valid)``; NaN where none is valid.
    """
    plain = _bilinear(ds, target)
    names = [v for v in gridded_variables(ds) if np.issubdtype(ds[v].dtype, np.floating)]
    lazy = any(ds[v].chunks is not None for v in names)
    if not names or not (lazy or any(bool(np.isnan(ds[v].values).any()) for v in names)):
        return plain
    filled = _bilinear(ds[names].fillna(0.0), target)
    valid = _bilinear(ds[names].notnull().astype(np.float64), target)
    out = plain.copy()
    for v in names:
        with np.errstate(invalid="ignore", divide="ignore"):
            gap_filled = filled[v] / valid[v].where(valid[v] > 1e-6)
        out[v] = (
            plain[v].where(plain[v].notnull(), gap_filled).astype(plain[v].dtype).assign_attrs(plain[v].attrs)
        )
    return out


ABSENT_LIMIT = 3
"""How many calendar months away a training month may be to stand in for a month the training data lack."""


def month_windows(
    model_months: np.ndarray, reference_months: np.ndarray, needed: int, what: str
) -> tuple[dict[int, tuple[int, ...]], dict[int, int]]:
    """The calendar months each fitted month pools, and how many training values that gives it.

    Every calendar month is fitted: it pools the months within +-k of it (cyclic, Dec next to Jan) for the
    smallest k in 0..:data:`POOL_LIMIT` at which both the model and the reference (month-of-year arrays, one
    entry per time step) have ``needed`` values (counted over the months present in both); k = 0 (the
    month alone) whenever it has enough. A month absent from the training data but within
    :data:`ABSENT_LIMIT` months of one present borrows its nearest months (a record of Jan-Sep fits Oct-Dec
    from Aug-Sep and Jan-Feb ...): what a user holding out the last months of a one-year record needs; the
    windows say so. Months further from any training month are not fitted (downscaling them raises). Returns ``(windows, counts)``:
    month -> the months pooled, in calendar order around it (January: ``(12, 1, 2)``), and month ->
    min(model, reference) values in that window. Raises :class:`BaselineError` (prefixed ``what``) when
    no month is shared or even the whole year holds fewer than ``needed`` values.
    """
    model_months, reference_months = np.asarray(model_months), np.asarray(reference_months)
    present = [int(m) for m in np.intersect1d(model_months, reference_months)]
    if not present:
        raise BaselineError(f"{what}: model and reference share no month of year")
    n_model = {m: int((model_months == m).sum()) for m in present}
    n_reference = {m: int((reference_months == m).sum()) for m in present}
    windows: dict[int, tuple[int, ...]] = {}
    counts: dict[int, int] = {}
    for month in range(1, 13):
        offset = {p: (p - month + 6) % 12 - 6 for p in present}  # signed, -6..5: Dec is -1 from Jan
        absent = month not in present
        if absent and min(abs(o) for o in offset.values()) > ABSENT_LIMIT:
            continue  # no training month near enough to stand in for it: downscaling it raises
        for k in range(POOL_LIMIT + 1):
            window = tuple(sorted((p for p in present if abs(offset[p]) <= k), key=offset.__getitem__))
            n = min(sum(n_model[p] for p in window), sum(n_reference[p] for p in window))
            if n >= needed:
                windows[month], counts[month] = window, n
                break
        else:
            if absent:
                continue
            raise BaselineError(
                f"{what}: need >= {needed} training values per month of year, got {n} even pooling the "
                f"whole year (months {present}); fit on a longer record"
            )
    return windows, counts


def _pooled(windows: dict[int, tuple[int, ...]]) -> dict[int, tuple[int, ...]]:
    """The windows of the months that pooled neighbours (those not fitted on their own values alone)."""
    return {m: w for m, w in windows.items() if w != (m,)}


def _float64(ds: xr.Dataset) -> xr.Dataset:
    """Gridded variables as float64: float32 rounding would otherwise create tied values, which make an
    empirical quantile mapping jump by a whole quantile step between tiny input differences."""
    return ds.assign({v: ds[v].astype(np.float64) for v in gridded_variables(ds)})


def _with_members(
    ds: xr.Dataset,
    members: int | Sequence[int],
    method: str,
    pooled: dict[int, tuple[int, ...]] | None = None,
) -> xr.Dataset:
    """Identical float32 copies of the gridded variables along a leading ``member`` dim; ``pooled`` (the
    months fitted on a window of neighbouring months, if any) is noted in the ``pooled_months`` attribute."""
    try:
        index = member_indices(members)
    except MethodError as exc:
        raise BaselineError(f"{method}: {exc}") from None
    out = ds.assign(
        {
            v: ds[v].astype("float32").expand_dims(member=np.array(index)).transpose("member", ...)
            for v in gridded_variables(ds)
        }
    )
    out = out.assign_attrs(downscaling_method=method, members_identical=int(len(index) > 1))
    if pooled:
        out.attrs["pooled_months"] = "; ".join(f"{m}: {list(w)}" for m, w in sorted(pooled.items()))
    return out


class _Baseline:
    """What the three baselines share: needs, validation, identity and description."""

    name: str
    needs: ClassVar[Needs]
    summary: ClassVar[str] = ""

    def validate(self, inputs: Inputs) -> None:
        inputs.require(self.needs, self.name)

    def identity(self, members: int, seed: int) -> list[Any]:
        return [self.config.model_dump(mode="json"), members]  # deterministic: the seed changes nothing

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "label": self.name,
            "report": f"{self.name}: {self.summary}",
            "config": self.config.model_dump(mode="json"),
            "stochastic": False,
        }

    def _coarse(self, inputs: Inputs) -> xr.Dataset:
        if inputs.coarse is None:
            raise BaselineError(f"{self.name}: needs the coarse fields on their own grid (Inputs.coarse)")
        return inputs.coarse


def _check_months(ds: xr.Dataset, months: np.ndarray, what: str) -> None:
    missing = sorted(set(np.unique(ds["time"].dt.month.values).tolist()) - set(months.tolist()))
    if missing:
        raise BaselineError(
            f"{what}: month(s) {missing} occur in the data but not in the training data it was fitted on; "
            "fit on training years that cover every month of year you downscale"
        )


# -- empirical quantile mapping ------------------------------------------------------------------------------
def _map_quantiles(v: np.ndarray, qm: np.ndarray, qr: np.ndarray, multiplicative: bool) -> np.ndarray:
    """Map ``v`` (..., n) through model quantiles ``qm`` onto reference quantiles ``qr`` ((..., nq), sorted).

    Inside [qm_1, qm_nq]: piecewise-linear interpolation of qr over qm, so a value equal to a model quantile
    maps exactly to the matching reference quantile; a value equal to several tied model quantiles maps to
    the mean of their reference quantiles (a mapping cannot split equal values). Outside: the end
    correction held constant, added (v + qr_end - qm_end) or, for multiplicative variables with
    qm_end > 0, multiplied (v * qr_end / qm_end).
    """
    nq = qm.shape[-1]
    below = (qm[..., None, :] < v[..., :, None]).sum(axis=-1)  # model quantiles < v: 0..nq
    upto = (qm[..., None, :] <= v[..., :, None]).sum(axis=-1)  # model quantiles <= v
    j = np.clip(upto, 1, nq - 1)
    x0, x1 = np.take_along_axis(qm, j - 1, axis=-1), np.take_along_axis(qm, j, axis=-1)
    y0, y1 = np.take_along_axis(qr, j - 1, axis=-1), np.take_along_axis(qr, j, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        inside = y0 + np.where(x1 > x0, (v - x0) / (x1 - x0), 0.0) * (y1 - y0)
        cum = np.concatenate([np.zeros_like(qr[..., :1]), np.cumsum(qr, axis=-1)], axis=-1)
        on_nodes = (np.take_along_axis(cum, upto, -1) - np.take_along_axis(cum, below, -1)) / (upto - below)
    inside = np.where(upto > below, on_nodes, inside)
    end = np.where(upto == 0, 0, nq - 1)
    qm_end, qr_end = np.take_along_axis(qm, end, axis=-1), np.take_along_axis(qr, end, axis=-1)
    outside = v + (qr_end - qm_end)
    if multiplicative:
        with np.errstate(invalid="ignore", divide="ignore"):
            outside = np.where(qm_end > 0, v * qr_end / qm_end, outside)
    out = np.where((upto == 0) | (below == nq), outside, inside)
    return np.maximum(out, 0.0) if multiplicative else out


def _adjust_core(
    v, months, qm, qr, fitted_months, multiplicative
):  # apply_ufunc core: time/quantile trailing
    out = np.full(v.shape, np.nan)
    for k, month in enumerate(fitted_months):
        sel = months == month
        if sel.any():
            out[..., sel] = _map_quantiles(
                v[..., sel].astype(np.float64), qm[..., k, :], qr[..., k, :], multiplicative
            )
    return out


@dataclass
class EmpiricalQuantileMapping:
    """Empirical quantile mapping per month of year and grid cell (Panofsky & Brier; Wood et al. 2004).

    ``fit(model, reference)`` stores, for every variable, month of year and cell, ``n_quantiles`` quantiles
    of the model and of the reference at the Hazen plotting positions p_i = (i + 0.5) / n (NumPy method
    "hazen"; default n = the fewest training values of any fitted month, so every training value is a node
    and the mapped training model reproduces the reference quantiles exactly). ``adjust(model)`` maps each
    value through :func:`_map_quantiles`. Model and reference must be on the same grid; their times need not
    match (distributions are compared, not pairs). Only months present in both can be adjusted. NaNs are
    skipped when fitting and stay NaN.

    Short records: a month with fewer than 2 training values (in model or reference) is fitted on the
    values of a cyclic window of neighbouring months, +-1, +-2, ... at most +-6 (:func:`month_windows`;
    ``pooled_months`` keeps month -> months pooled), e.g. every month of a one-year monthly record pools
    its two neighbours. Months with >= 2 values use only their own, exactly as without pooling. Months
    absent from the training data are fitted on their nearest months' values (a one-year record held out
    by months), and ``pooled_months`` says so.
    """

    n_quantiles: int | None = None
    model_quantiles: xr.Dataset | None = field(default=None, repr=False)
    reference_quantiles: xr.Dataset | None = field(default=None, repr=False)
    pooled_months: dict[int, tuple[int, ...]] = field(default_factory=dict)

    def fit(self, model: xr.Dataset, reference: xr.Dataset) -> EmpiricalQuantileMapping:
        names = _common_variables(model, reference, "quantile mapping fit")
        if not _same_grid(
            _as_grid(model, "quantile mapping model"), _as_grid(reference, "quantile mapping reference")
        ):
            raise BaselineError(
                "quantile mapping fit: model and reference must be on the same lat/lon grid; regrid one first"
            )
        m_months, r_months = model["time"].dt.month.values, reference["time"].dt.month.values
        windows, counts = month_windows(m_months, r_months, 2, "quantile mapping fit")
        months = np.array(sorted(windows))
        self.pooled_months = _pooled(windows)
        nq = self.n_quantiles or int(min(counts.values()))
        if nq < 2:
            raise BaselineError(f"quantile mapping fit: need >= 2 quantiles per month, got n_quantiles={nq}")
        p = (np.arange(nq) + 0.5) / nq

        def quantiles(ds: xr.Dataset, month_of: np.ndarray) -> xr.Dataset:
            out = {}
            for var in names:
                da = ds[var].transpose("time", ...)
                values = np.asarray(da.values, dtype=np.float64)  # computes a lazy input once
                per_month = []
                for m in months:
                    sample = values[np.isin(month_of, windows[int(m)])]  # == m when not pooled
                    # np.quantile is vectorised; nanquantile loops over cells in Python (10x slower): use it
                    # only when there are gaps. Both give the same numbers on complete data.
                    q = np.nanquantile if np.isnan(sample).any() else np.quantile
                    with np.errstate(invalid="ignore"), _quiet_all_nan():
                        per_month.append(q(sample, p, axis=0, method="hazen"))
                dims = ("month", "quantile", *da.dims[1:])
                out[var] = xr.DataArray(
                    np.stack(per_month),
                    dims=dims,
                    coords={"month": months, "quantile": p, **{d: da[d] for d in da.dims[1:]}},
                )
            return xr.Dataset(out)

        self.model_quantiles = quantiles(model, m_months)
        self.reference_quantiles = quantiles(reference, r_months)
        return self

    def describe(self, model: xr.Dataset, reference: xr.Dataset) -> dict[str, Any]:
        """JSON record of this fitted mapping from ``model`` (the data it was fitted on) to ``reference``:
        period and years of the model, quantiles, the mean adjustment per variable and month (reference minus
        model quantiles, over cells and quantiles), and the hash of the fitted quantiles (what provenance keeps)."""
        import hashlib

        qm, qr = self.model_quantiles, self.reference_quantiles
        digest = hashlib.sha256()
        for ds in (qm, qr):
            for v in sorted(ds.data_vars):
                digest.update(np.ascontiguousarray(ds[v].values, dtype=np.float64).tobytes())
        times = model["time"].values
        return {
            "method": "empirical quantile mapping per calendar month and cell (additive; ratio for pr)",
            "perfect_model": False,
            "model_period": [
                f"{times[0].year:04d}-{times[0].month:02d}",
                f"{times[-1].year:04d}-{times[-1].month:02d}",
            ],
            "model_years": len({t.year for t in times}),
            "reference_steps": int(reference.sizes["time"]),
            "n_quantiles": int(qm.sizes["quantile"]),
            "mean_adjustment": {
                str(v): {
                    int(m): round(float(d), 4)
                    for m, d in zip(
                        qm["month"].values,
                        (qr[v] - qm[v]).mean([d for d in qm[v].dims if d != "month"]).values,
                        strict=True,
                    )
                }
                for v in qm.data_vars
            },
            "quantiles_sha256": digest.hexdigest(),
        }

    def adjust(self, model: xr.Dataset) -> xr.Dataset:
        if self.model_quantiles is None or self.reference_quantiles is None:
            raise BaselineError("quantile mapping: call fit(model, reference) before adjust")
        fitted = self.model_quantiles["month"].values
        _check_months(model, fitted, "quantile mapping adjust")
        out = model.copy()
        for var in gridded_variables(model):
            if var not in self.model_quantiles:
                raise BaselineError(
                    f"quantile mapping adjust: variable {var!r} was not fitted; "
                    f"fitted: {list(self.model_quantiles)}"
                )
            da = model[var]
            qm, qr = self.model_quantiles[var], self.reference_quantiles[var]
            if (
                da.sizes["lat"] != qm.sizes["lat"]
                or da.sizes["lon"] != qm.sizes["lon"]
                or not (np.allclose(da["lat"], qm["lat"]) and np.allclose(da["lon"] % 360, qm["lon"] % 360))
            ):
                raise BaselineError(f"quantile mapping adjust: {var!r} is not on the grid it was fitted on")
            qm, qr = (q.assign_coords(lat=da["lat"], lon=da["lon"]) for q in (qm, qr))
            adjusted = xr.apply_ufunc(
                _adjust_core,
                da,
                da["time"].dt.month,
                qm,
                qr,
                kwargs={"fitted_months": fitted, "multiplicative": var in MULTIPLICATIVE_VARIABLES},
                input_core_dims=[["time"], ["time"], ["month", "quantile"], ["month", "quantile"]],
                output_core_dims=[["time"]],
                dask="parallelized",
                output_dtypes=[np.float64],
                dask_gufunc_kwargs={"allow_rechunk": True},
            )
            out[var] = adjusted.transpose(*da.dims).astype(da.dtype).assign_attrs(da.attrs)
        return out


def _fit_record(
    mapping: EmpiricalQuantileMapping,
    model_train: xr.Dataset | None,
    model: xr.Dataset,
    reference: xr.Dataset,
) -> dict[str, Any]:
    """What a baseline's mapping was fitted on: the input's own fields (``model_train``: described), or the
    truth's coarse view (nothing about the input's bias was learnt)."""
    if model_train is None:
        return {
            "method": "fitted on the truth's coarse view (the input is taken as unbiased)",
            "perfect_model": True,
        }
    return mapping.describe(model, reference)


class _quiet_all_nan:
    """Silence NumPy's 'All-NaN slice' RuntimeWarning for masked cells (they stay NaN on purpose)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message="All-NaN slice", category=RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# -- the baselines ---------------------------------------------------------------------------------------
class BilinearConfig(MethodConfig):
    """Bilinear interpolation of the coarse field to the fine cell centres."""

    name: Literal["bilinear"] = "bilinear"


class DeltaConfig(MethodConfig):
    """Bilinear interpolation plus the training period's mean fine-minus-bilinear residual (ratio for pr)."""

    name: Literal["delta"] = "delta"
    per_month: bool = Field(True, description="one residual per calendar month; False: one all-time mean")
    min_values: int = Field(
        2, ge=1, description="training values a calendar month needs before neighbouring months are pooled"
    )


FIT_ON_INPUT_HELP = (
    "fit the quantile mapping on the coarse input's own fields over the training years the run covers (a GCM's "
    "bias is corrected toward the truth); false: on the truth's coarse view (the input is taken as unbiased). A "
    "perfect-model evaluation fits on the truth's view either way"
)


class QuantileMappingConfig(MethodConfig):
    """Bilinear interpolation, then empirical quantile mapping per month of year and fine cell."""

    name: Literal["qm"] = "qm"
    n_quantiles: int | None = Field(
        None, ge=2, description="quantiles per month and cell; default: every value"
    )
    bias_correction: bool = Field(True, description=FIT_ON_INPUT_HELP)


class BCSDConfig(MethodConfig):
    """Bias correction and spatial disaggregation (Wood et al. 2004)."""

    name: Literal["bcsd"] = "bcsd"
    n_quantiles: int | None = Field(
        None, ge=2, description="quantiles per month and cell; default: every value"
    )
    bias_correction: bool = Field(True, description=FIT_ON_INPUT_HELP)


@dataclass
class BilinearDownscaler(_Baseline):
    """Bilinear interpolation of the coarse field to the target cell centres (regrid.bilinear)."""

    name: str = "bilinear"
    needs: ClassVar[Needs] = Needs()
    summary: ClassVar[str] = "bilinear interpolation of the coarse field"

    @property
    def config(self) -> MethodConfig:
        return BilinearConfig()

    def fit(self, coarse_train: xr.Dataset, fine_train: xr.Dataset) -> BilinearDownscaler:
        return self  # nothing to learn

    def downscale(self, inputs: Inputs, members: int | Sequence[int] = 1, seed: int = 0) -> xr.Dataset:
        coarse, target = self._coarse(inputs), inputs.grid
        return _with_members(_bilinear(coarse, target), members, self.name)


@dataclass
class DeltaDownscaler(_Baseline):
    """Bilinear interpolation plus the mean residual of the training period, per fine cell and calendar month.

    fit (paired training time steps, those of both ``coarse_train`` and ``fine_train``):
      residual = mean over the month's training steps of fine - bilinear(coarse) (tas, uas, vas, psl), or
      ratio = mean(fine) / mean(bilinear(coarse)) over the same steps (pr; 1 where that bilinear mean is
      <= 0); NaN values are skipped (a cell never valid stays NaN). The bilinear is the one
      :class:`BilinearDownscaler` uses (NaN coarse cells left out of the stencil, :func:`_bilinear_skipna`).
      A month with fewer than ``min_values`` training steps pools a cyclic window of neighbouring months
      (+-1, +-2, ... at most +-6: :func:`month_windows`; ``pooled_months`` keeps which). ``per_month=False``:
      one mean over all training steps.
    downscale: bilinear(coarse) + residual of each step's calendar month, or bilinear * ratio clipped at 0.
    Months absent from the training data raise :class:`BaselineError` (per_month only).
    """

    per_month: bool = True
    min_values: int = 2
    name: str = "delta"
    needs: ClassVar[Needs] = Needs(fit=True)
    summary: ClassVar[str] = (
        "bilinear plus the training period's mean fine-minus-bilinear residual per cell and calendar month"
    )
    residual: xr.Dataset | None = field(default=None, repr=False)  # (month, lat, lon), or (lat, lon)
    pooled_months: dict[int, tuple[int, ...]] = field(default_factory=dict)
    coarse_grid: Grid | None = None
    fine_grid: Grid | None = None

    @property
    def config(self) -> MethodConfig:
        return DeltaConfig(per_month=self.per_month, min_values=self.min_values)

    def fit(self, coarse_train: xr.Dataset, fine_train: xr.Dataset) -> DeltaDownscaler:
        where = f"{self.name} fit"
        names = _common_variables(coarse_train, fine_train, where)
        self.coarse_grid = _as_grid(coarse_train, f"{self.name} coarse_train")
        self.fine_grid = _as_grid(fine_train, f"{self.name} fine_train")
        interpolated = _bilinear_skipna(_float64(coarse_train[names]), self.fine_grid)
        interpolated = interpolated.assign_coords(lat=fine_train["lat"].values, lon=fine_train["lon"].values)
        interpolated, fine = xr.align(interpolated[names], _float64(fine_train[names]), join="inner")
        if fine.sizes["time"] == 0:
            raise BaselineError(
                f"{where}: coarse_train and fine_train share no time step; the residual needs paired steps"
            )
        months = fine["time"].dt.month.values
        if self.per_month:
            windows, _ = month_windows(months, months, self.min_values, where)
        else:
            present = tuple(int(m) for m in np.unique(months))
            if months.size < self.min_values:
                raise BaselineError(f"{where}: need >= {self.min_values} training values, got {months.size}")
            windows = {0: present}
        self.pooled_months = _pooled(windows) if self.per_month else {}
        out = {}
        for var in names:
            f, b = fine[var], interpolated[var]
            both = f.notnull() & b.notnull()
            if var in MULTIPLICATIVE_VARIABLES:
                sums = {"num": f.where(both, 0.0), "den": b.where(both, 0.0), "n": both.astype(np.float64)}
            else:
                sums = {"num": (f - b).where(both, 0.0), "n": both.astype(np.float64)}
            monthly = xr.Dataset(sums).groupby("time.month").sum("time").compute()
            maps = []
            for window in windows.values():
                pooled = monthly.sel(month=list(window)).sum("month")
                valid = pooled["n"] > 0
                if var in MULTIPLICATIVE_VARIABLES:
                    ratio = (pooled["num"] / pooled["den"].where(pooled["den"] > 0)).fillna(1.0)
                    maps.append(ratio.clip(min=0.0).where(valid))
                else:
                    maps.append((pooled["num"] / pooled["n"].where(valid)).where(valid))
            da = xr.concat(maps, "month").assign_coords(month=list(windows)) if self.per_month else maps[0]
            out[var] = da.reset_coords(drop=True).assign_attrs(fine_train[var].attrs)
        self.residual = xr.Dataset(out)
        return self

    def downscale(self, inputs: Inputs, members: int | Sequence[int] = 1, seed: int = 0) -> xr.Dataset:
        coarse = self._coarse(inputs)
        if self.residual is None:
            raise BaselineError(f"{self.name}: call fit(coarse_train, fine_train) before downscale")
        grid = _as_grid(inputs.grid, f"{self.name} target")
        if not _same_grid(grid, self.fine_grid):
            raise BaselineError(
                f"{self.name}: target {grid.describe()} is not the grid fitted on "
                f"({self.fine_grid.describe()})"
            )
        if not _same_grid(_as_grid(coarse, f"{self.name} coarse"), self.coarse_grid):
            raise BaselineError(
                f"{self.name}: coarse input is not on the grid fitted on ({self.coarse_grid.describe()})"
            )
        names = gridded_variables(coarse)
        missing = [str(v) for v in names if v not in self.residual]
        if missing:
            raise BaselineError(
                f"{self.name}: variable(s) {missing} were not fitted; fitted: {list(map(str, self.residual))}"
            )
        if self.per_month:
            _check_months(coarse, self.residual["month"].values, f"{self.name} downscale")
        interpolated = _bilinear_skipna(_float64(coarse[names + _others(coarse)]), grid)
        out = interpolated.copy()
        for var in names:
            residual = self.residual[var]
            if self.per_month:
                residual = residual.sel(month=interpolated["time"].dt.month).drop_vars("month")
            residual = residual.assign_coords(lat=interpolated["lat"], lon=interpolated["lon"])
            b = interpolated[var]
            combined = (b * residual).clip(min=0.0) if var in MULTIPLICATIVE_VARIABLES else b + residual
            out[var] = combined.transpose(*b.dims).astype("float32").assign_attrs(coarse[var].attrs)
        return _with_members(out, members, self.name, self.pooled_months)


@dataclass
class QuantileMappingDownscaler(_Baseline):
    """Bilinear interpolation to the fine grid, then empirical quantile mapping per month and fine cell.

    ``fit`` maps the distribution of bilinear(model) onto that of fine_train at every fine cell (its grid becomes
    the only valid ``target``), ``model`` being ``model_train`` (the coarse input's own fields over the training
    years, which the downscale stage passes when ``bias_correction``) or else ``coarse_train`` (the truth's coarse
    view); ``downscale`` interpolates and applies the mapping.
    """

    n_quantiles: int | None = None
    bias_correction: bool = True
    name: str = "qm"
    mapping: EmpiricalQuantileMapping | None = field(default=None, repr=False)
    grid: Grid | None = None
    fit_record: dict[str, Any] | None = None
    summary: ClassVar[str] = (
        "bilinear + empirical quantile mapping per month and fine cell (fitted on training years)"
    )

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return Needs(fit=True, fit_model=self.bias_correction)

    @property
    def config(self) -> MethodConfig:
        return QuantileMappingConfig(n_quantiles=self.n_quantiles, bias_correction=self.bias_correction)

    def fit(
        self, coarse_train: xr.Dataset, fine_train: xr.Dataset, model_train: xr.Dataset | None = None
    ) -> QuantileMappingDownscaler:
        names = _common_variables(coarse_train, fine_train, f"{self.name} fit")
        self.grid = _as_grid(fine_train, f"{self.name} fine_train")
        model = coarse_train if model_train is None else model_train
        interpolated = _bilinear_skipna(_float64(model[names]), self.grid)
        self.mapping = EmpiricalQuantileMapping(self.n_quantiles).fit(interpolated, fine_train[names])
        self.fit_record = _fit_record(self.mapping, model_train, interpolated, fine_train[names])
        return self

    def fitted(self) -> dict[str, Any] | None:
        """What the mapping was fitted on (the downscale stage's provenance records it)."""
        return self.fit_record

    def downscale(self, inputs: Inputs, members: int | Sequence[int] = 1, seed: int = 0) -> xr.Dataset:
        coarse, target = self._coarse(inputs), inputs.grid
        if self.mapping is None or self.grid is None:
            raise BaselineError(f"{self.name}: call fit(coarse_train, fine_train) before downscale")
        grid = _as_grid(target, f"{self.name} target")
        if not _same_grid(grid, self.grid):
            raise BaselineError(
                f"{self.name}: target {grid.describe()} is not the grid fitted on ({self.grid.describe()})"
            )
        adjusted = self.mapping.adjust(_bilinear_skipna(_float64(coarse), grid))
        return _with_members(adjusted, members, self.name, self.mapping.pooled_months)


@dataclass
class BCSDDownscaler(_Baseline):
    """Bias Correction and Spatial Disaggregation (Wood et al. 2004), per month of year.

    fit (training years only):
      1. the reference on the coarse grid: fine_train block-averaged (regrid.coarsen_blocks) when the coarse
         grid is a whole-number coarsening of the fine one, else regridded conservatively;
      2. empirical quantile mapping of the coarse model onto that coarse reference, per month and coarse cell:
         ``model_train`` (the coarse input's own fields over the training years, which the downscale stage passes
         when ``bias_correction``), else ``coarse_train`` (the truth's coarse view: nothing to correct);
      3. monthly climatologies of the coarse reference and of fine_train.
    downscale:
      1. bias-correct the coarse field (:meth:`bias_correct`);
      2. anomaly w.r.t. the coarse reference climatology: bc - clim_coarse (tas, uas, vas, psl) or
         bc / clim_coarse (pr; 1 where clim_coarse <= 0);
      3. interpolate the anomaly bilinearly to the fine grid and apply it to the fine climatology:
         clim_fine + anomaly, or clim_fine * ratio.
    Short records: the quantile mapping pools neighbouring months where a month has < 2 values (see
    :class:`EmpiricalQuantileMapping`); the climatologies stay each month's own mean. NaN fine cells give
    NaN fine climatologies and so NaN output there; a coarse cell with no valid fine cell is left out of the
    anomaly's interpolation (:func:`_bilinear_skipna`).
    """

    n_quantiles: int | None = None
    bias_correction: bool = True
    name: str = "bcsd"
    summary: ClassVar[str] = "bias correction on the coarse grid + spatial disaggregation (Wood et al. 2004)"
    mapping: EmpiricalQuantileMapping | None = field(default=None, repr=False)
    coarse_climatology: xr.Dataset | None = field(default=None, repr=False)
    fine_climatology: xr.Dataset | None = field(default=None, repr=False)
    coarse_grid: Grid | None = None
    fine_grid: Grid | None = None
    fit_record: dict[str, Any] | None = None

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        return Needs(fit=True, fit_model=self.bias_correction)

    @property
    def config(self) -> MethodConfig:
        return BCSDConfig(n_quantiles=self.n_quantiles, bias_correction=self.bias_correction)

    def fit(
        self, coarse_train: xr.Dataset, fine_train: xr.Dataset, model_train: xr.Dataset | None = None
    ) -> BCSDDownscaler:
        names = _common_variables(coarse_train, fine_train, f"{self.name} fit")
        self.coarse_grid = _as_grid(coarse_train, f"{self.name} coarse_train")
        self.fine_grid = _as_grid(fine_train, f"{self.name} fine_train")
        reference = self.coarse_reference(fine_train[names])
        model = coarse_train if model_train is None else model_train
        self.mapping = EmpiricalQuantileMapping(self.n_quantiles).fit(_float64(model[names]), reference)
        self.fit_record = _fit_record(self.mapping, model_train, model[names], reference)
        windows = self.mapping.pooled_months
        self.coarse_climatology = _all_months(reference.groupby("time.month").mean("time").compute(), windows)
        self.fine_climatology = _all_months(
            fine_train[names].groupby("time.month").mean("time").compute(), windows
        )
        return self

    def fitted(self) -> dict[str, Any] | None:
        """What the bias correction was fitted on (the downscale stage's provenance records it)."""
        return self.fit_record

    def coarse_reference(self, fine: xr.Dataset) -> xr.Dataset:
        """``fine`` area-averaged onto the fitted coarse grid (coordinates exactly the coarse grid's)."""
        from climrecon.methods.features import coarse_view

        return coarse_view(fine, self.coarse_grid)

    def bias_correct(self, coarse: xr.Dataset) -> xr.Dataset:
        """Step 1: ``coarse`` quantile-mapped onto the coarse reference climate, on the coarse grid."""
        if self.mapping is None:
            raise BaselineError(f"{self.name}: call fit(coarse_train, fine_train) before downscale")
        if not _same_grid(_as_grid(coarse, f"{self.name} coarse"), self.coarse_grid):
            raise BaselineError(
                f"{self.name}: coarse input is not on the grid fitted on ({self.coarse_grid.describe()})"
            )
        coarse = coarse.assign_coords(lat=self.coarse_grid.lat, lon=self.coarse_grid.lon)
        return self.mapping.adjust(
            _float64(
                coarse[
                    [v for v in gridded_variables(coarse) if v in self.coarse_climatology] + _others(coarse)
                ]
            )
        )

    def downscale(self, inputs: Inputs, members: int | Sequence[int] = 1, seed: int = 0) -> xr.Dataset:
        coarse, target = self._coarse(inputs), inputs.grid
        corrected = self.bias_correct(coarse)
        grid = _as_grid(target, f"{self.name} target")
        if not _same_grid(grid, self.fine_grid):
            raise BaselineError(
                f"{self.name}: target {grid.describe()} is not the grid fitted on "
                f"({self.fine_grid.describe()})"
            )
        names = gridded_variables(corrected)
        clim_c = self.coarse_climatology[names].sel(month=corrected["time"].dt.month).drop_vars("month")
        clim_f = self.fine_climatology[names].sel(month=corrected["time"].dt.month).drop_vars("month")
        anomaly = corrected.copy()
        for var in names:
            if var in MULTIPLICATIVE_VARIABLES:
                anomaly[var] = (
                    (corrected[var] / clim_c[var].where(clim_c[var] > 0))
                    .fillna(1.0)
                    .where(corrected[var].notnull())
                )
            else:
                anomaly[var] = corrected[var] - clim_c[var]
        fine_anomaly = _bilinear_skipna(anomaly, grid)
        clim_f = clim_f.assign_coords(lat=fine_anomaly["lat"], lon=fine_anomaly["lon"])
        out = fine_anomaly.copy()
        for var in names:
            combined = (
                (clim_f[var] * fine_anomaly[var]).clip(min=0.0)  # an extrapolated ratio can dip below 0
                if var in MULTIPLICATIVE_VARIABLES
                else clim_f[var] + fine_anomaly[var]
            )
            out[var] = (
                combined.transpose(*fine_anomaly[var].dims).astype("float32").assign_attrs(coarse[var].attrs)
            )
        return _with_members(out, members, self.name, self.mapping.pooled_months)


def _all_months(climatology: xr.Dataset, windows: dict[int, tuple[int, ...]]) -> xr.Dataset:
    """A monthly climatology (``month`` dim) with every month its training data lacks set to the mean of the
    months of its window (:func:`month_windows`); unchanged when no month is missing."""
    have = set(climatology["month"].values.tolist())
    extra = {m: w for m, w in windows.items() if m not in have}
    if not extra:
        return climatology
    filled = [
        climatology.sel(month=[p for p in w if p in have]).mean("month").expand_dims(month=[m])
        for m, w in extra.items()
    ]
    return xr.concat([climatology, *filled], "month").sortby("month")


def _others(ds: xr.Dataset) -> list[Hashable]:
    """Non-gridded data variables (e.g. time_bnds) that travel along unchanged."""
    return [v for v in ds.data_vars if v not in gridded_variables(ds)]


# -- registration ----------------------------------------------------------------------------------------
def _register() -> None:
    from climrecon.methods import register

    register(
        BilinearConfig,
        lambda cfg, sampler: BilinearDownscaler(),
        BilinearDownscaler.summary,
        needs="coarse fields; any factor",
    )
    register(
        DeltaConfig,
        lambda cfg, sampler: DeltaDownscaler(cfg.per_month, cfg.min_values),
        DeltaDownscaler.summary,
        needs="coarse fields; paired training years; any factor",
    )
    register(
        QuantileMappingConfig,
        lambda cfg, sampler: QuantileMappingDownscaler(cfg.n_quantiles, cfg.bias_correction),
        QuantileMappingDownscaler.summary,
        needs="coarse fields; paired training years; any factor",
    )
    register(
        BCSDConfig,
        lambda cfg, sampler: BCSDDownscaler(cfg.n_quantiles, cfg.bias_correction),
        BCSDDownscaler.summary,
        needs="coarse fields; paired training years; any factor",
    )


_register()
