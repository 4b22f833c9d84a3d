"""Local regression downscaling: the strongest simple baseline on the synthetic reanalysis.

The statistical downscaling a climate scientist writes after the climatological delta (a "perfect prognosis"
regression, as in SDSM or the MOS-style local regressions of the VALUE intercomparison): at every fine cell,

    fine = bilinear(coarse) + residual climatology of the calendar month
           + sum_f w_f * (standardised coarse anomaly f)

where the predictors ``f`` are the coarse anomalies (the coarse field minus its training climatology of the
calendar month, divided by the variable's training standard deviation) of the predictor variables at the
``(2 halo + 1)^2`` coarse cells around the fine cell's own coarse cell (the grid edge repeated outside it),
and the weights are a ridge regression of the residual anomaly on them, fitted per fine cell on the paired
training steps only. The ridge strength is chosen per variable by exact leave-one-out error over a grid of
strengths (:data:`RIDGE_GRID`, times the number of training steps), so short records are regularised more
without a setting. What it can learn: any response of the fine-scale residual that is linear in the
large-scale anomalies around it and differs from cell to cell (wind speed-up and turning over terrain,
lapse-rate anomalies); what it cannot: non-linear responses (precipitation thresholds), spread (it is
deterministic). On the synthetic reanalysis at x8 it beats every diffusion model of the product on tas,
uas and vas (``benchmarks/results/methods_x8.json``), which is why it is among the baselines.

Precipitation is regressed additively like the other variables and clipped at 0. Missing fine cells (NaN)
are fitted on their valid steps and stay NaN where never valid; a missing coarse predictor (a coarse cell
with no valid fine cell) counts as its climatology (anomaly 0).

Contract: :class:`~climrecon.methods.base.Method` like the other baselines (:mod:`.baselines`): ``fit`` on
paired training steps, ``downscale`` on the fitted grids only, identical members.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import xarray as xr
from pydantic import Field

from climrecon.methods.base import Inputs, MethodConfig, Needs, gridded_variables
from climrecon.methods.baselines import (
    MULTIPLICATIVE_VARIABLES,
    BaselineError,
    _as_grid,
    _Baseline,
    _bilinear_skipna,
    _check_months,
    _common_variables,
    _float64,
    _others,
    _pooled,
    _same_grid,
    _with_members,
    month_windows,
)
from climrecon.tasks import regrid
from climrecon.tasks.grids import Grid

__all__ = [
    "LocalRegressionConfig",
    "LocalRegression",
    "LocalRegressionDownscaler",
    "RIDGE_GRID",
]

RIDGE_GRID = tuple(float(a) for a in np.logspace(-7, 3, 21))
"""Ridge strengths tried, per training step (the penalty is ``alpha * n_steps``; predictors standardised)."""


class LocalRegressionConfig(MethodConfig):
    """Bilinear + residual climatology + a ridge regression per fine cell on the surrounding coarse anomalies."""

    name: Literal["local_regression"] = "local_regression"
    halo: int = Field(
        2, ge=0, le=6, description="coarse cells each side of the fine cell's own in the predictors"
    )
    predictors: dict[str, list[str]] | None = Field(
        None,
        description="per target variable, the coarse variables that predict it; default: every variable "
        "of the input predicts every variable",
    )
    ridge: float | None = Field(
        None,
        gt=0,
        description="ridge strength per training step; default: chosen by leave-one-out per variable",
    )
    min_values: int = Field(
        2, ge=1, description="training values a calendar month needs before neighbouring months are pooled"
    )


def _neighbourhood_index(n_coarse: int, centre: np.ndarray, halo: int) -> np.ndarray:
    """(n_fine, 2 halo + 1) coarse indices around each fine cell's coarse index, clamped to the grid."""
    offsets = np.arange(-halo, halo + 1)
    return np.clip(centre[:, None] + offsets[None, :], 0, n_coarse - 1)


def _containing(coarse_centres: np.ndarray, fine_centres: np.ndarray) -> np.ndarray:
    """Index of the coarse cell whose centre is nearest to each fine centre (the one containing it)."""
    return np.abs(fine_centres[:, None] - coarse_centres[None, :]).argmin(axis=1)


def _loo_ridge(x: np.ndarray, y: np.ndarray, alphas: Sequence[float]) -> np.ndarray:
    """Leave-one-out sum of squared errors of the ridge fits (no intercept) of every column of ``y`` (n, m) on
    ``x`` (n, p), one per penalty ``alpha * n`` of ``alphas``: exact, through the hat matrix's diagonal
    (``e_i / (1 - H_ii)``), from one SVD of ``x``."""
    n = x.shape[0]
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    uty = u.T @ y
    s2 = s**2
    sse = np.empty(len(alphas))
    for k, alpha in enumerate(alphas):
        shrink = s2 / (s2 + alpha * n)
        fitted = u @ (shrink[:, None] * uty)
        leverage = (u**2) @ shrink
        loo = (y - fitted) / np.maximum(1.0 - leverage, 1e-9)[:, None]
        sse[k] = float((loo**2).sum())
    return sse


ARRAY_PREFIX = "first_guess"  # names of a fitted regression's arrays in a checkpoint (``first_guess/...``)


def _grid_record(grid: Grid) -> dict[str, float | int]:
    return {k: getattr(grid, k) for k in ("south", "west", "dlat", "dlon", "nlat", "nlon")}


@dataclass
class LocalRegression:
    """The fitted regression (NumPy): grids, climatologies, predictor scales and per-cell weights.

    ``fit(coarse, fine)``: coarse fields on their grid, fine truth on its grid, paired steps (inner join on
    time). ``residual(coarse, months)``: the predicted fine-minus-bilinear residual (time, lat, lon) per
    variable, the climatology included. ``ridge`` holds the strength used per variable (per training step).
    """

    variables: list[str]
    predictors: dict[str, list[str]]
    halo: int = 2
    ridge: dict[str, float] = field(default_factory=dict)
    fixed_ridge: float | None = None
    min_values: int = 2
    coarse_grid: Grid | None = None
    fine_grid: Grid | None = None
    windows: dict[int, tuple[int, ...]] = field(default_factory=dict)
    coarse_climatology: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # (12, cy, cx)
    coarse_scale: dict[str, float] = field(default_factory=dict)
    residual_climatology: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # (12, fy, fx)
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # (fy, fx, n_features)

    # -- predictors ---------------------------------------------------------------------------------------
    def _anomalies(
        self, coarse: xr.Dataset, months: np.ndarray, names: Sequence[str]
    ) -> dict[str, np.ndarray]:
        out = {}
        for name in names:
            values = np.asarray(coarse[name].transpose("time", "lat", "lon").values, np.float64)
            anomaly = (values - self.coarse_climatology[name][months - 1]) / self.coarse_scale[name]
            out[name] = np.nan_to_num(anomaly, nan=0.0)  # a missing coarse cell: its climatology
        return out

    def _design(self, anomalies: dict[str, np.ndarray], names: Sequence[str], cy: int, cx: int) -> np.ndarray:
        """(time, n_features) predictors of the fine cells of coarse cell (cy, cx): the anomalies of ``names``
        at the (2 halo + 1)^2 coarse cells around it (edge cells repeated beyond the grid), row-major."""
        rows = _neighbourhood_index(self.coarse_grid.nlat, np.array([cy]), self.halo)[0]
        cols = _neighbourhood_index(self.coarse_grid.nlon, np.array([cx]), self.halo)[0]
        return np.concatenate(
            [anomalies[n][:, rows[:, None], cols[None, :]].reshape(len(anomalies[n]), -1) for n in names],
            axis=1,
        )

    def _groups(self) -> list[tuple[int, int, np.ndarray]]:
        """(cy, cx, flat indices of the fine cells whose nearest coarse centre is (cy, cx)): cells that share
        their predictors, so one factorisation serves them all."""
        iy, ix = self._cells()
        fx = self.fine_grid.nlon
        out = []
        for cy in np.unique(iy):
            for cx in np.unique(ix):
                rows, cols = np.nonzero(iy == cy)[0], np.nonzero(ix == cx)[0]
                out.append((int(cy), int(cx), (rows[:, None] * fx + cols[None, :]).ravel()))
        return out

    def _cells(self) -> tuple[np.ndarray, np.ndarray]:
        return (
            _containing(self.coarse_grid.lat, self.fine_grid.lat),
            _containing(self.coarse_grid.lon, self.fine_grid.lon),
        )

    # -- fit ----------------------------------------------------------------------------------------------
    def fit(
        self, coarse: xr.Dataset, fine: xr.Dataset, what: str = "local_regression fit"
    ) -> LocalRegression:
        self.coarse_grid = _as_grid(coarse, f"{what} coarse_train")
        self.fine_grid = _as_grid(fine, f"{what} fine_train")
        used = sorted({p for v in self.variables for p in self.predictors[v]})
        missing = [p for p in used if p not in coarse.data_vars]
        if missing:
            raise BaselineError(f"{what}: predictor variable(s) {missing} not in the coarse training data")
        coarse = _float64(coarse[used])
        interpolated = _bilinear_skipna(coarse[[v for v in self.variables]], self.fine_grid)
        interpolated = interpolated.assign_coords(lat=fine["lat"].values, lon=fine["lon"].values)
        coarse, interpolated, truth = xr.align(
            coarse, interpolated, _float64(fine[self.variables]), join="inner", exclude=("lat", "lon")
        )
        n = truth.sizes["time"]
        if n < 2:
            raise BaselineError(f"{what}: need >= 2 paired training steps of coarse and fine data, got {n}")
        months = truth["time"].dt.month.values
        self.windows, _ = month_windows(months, months, self.min_values, what)
        for name in used:
            c = coarse[name]
            self.coarse_climatology[name] = _f32(_monthly(c, self.windows))
            anomaly = c.transpose("time", "lat", "lon").values - self.coarse_climatology[name][months - 1]
            scale = float(np.nanstd(anomaly)) if np.isfinite(anomaly).any() else 0.0
            self.coarse_scale[name] = scale if scale > 0 else 1.0
        anomalies = self._anomalies(coarse, months, used)
        groups = self._groups()
        for var in self.variables:
            residual = (truth[var] - interpolated[var]).transpose("time", "lat", "lon")
            self.residual_climatology[var] = _f32(_monthly(residual, self.windows))
            target = residual.values - self.residual_climatology[var][months - 1]  # (n, fy, fx)
            self._fit_variable(var, anomalies, target, groups)
        return self

    def _fit_variable(
        self,
        var: str,
        anomalies: dict[str, np.ndarray],
        target: np.ndarray,
        groups: list[tuple[int, int, np.ndarray]],
    ) -> None:
        """Ridge per fine cell, the strength chosen by the summed leave-one-out error of every cell (pass 1),
        then the weights at that strength (pass 2); memory of one coarse cell's design at a time."""
        n, fy, fx = target.shape
        alphas = RIDGE_GRID if self.fixed_ridge is None else (self.fixed_ridge,)
        flat = target.reshape(n, -1)
        valid = np.isfinite(flat)

        def problems():  # (fine cells, design rows, targets) sharing one design
            for cy, cx, cells in groups:
                x = self._design(anomalies, self.predictors[var], cy, cx)
                complete = valid[:, cells].all(axis=0)
                if complete.any():
                    yield cells[complete], x, flat[:, cells[complete]]
                for cell in cells[~complete]:  # cells missing at some steps: fitted on their own valid rows
                    rows = valid[:, cell]
                    if rows.sum() >= 2:
                        yield np.array([cell]), x[rows], flat[rows, cell][:, None]

        sse, fitted = np.zeros(len(alphas)), False
        if len(alphas) > 1:
            for _, x, y in problems():
                sse += _loo_ridge(x, y, alphas)
        alpha = alphas[int(np.argmin(sse))]
        self.ridge[var] = float(alpha)
        weights = np.full((fy * fx, len(self.predictors[var]) * (2 * self.halo + 1) ** 2), np.nan)
        for cells, x, y in problems():
            gram = x.T @ x + alpha * len(x) * np.eye(x.shape[1])
            weights[cells] = np.linalg.solve(gram, x.T @ y).T
            fitted = True
        if not fitted:
            raise BaselineError(f"local_regression fit: variable {var!r} has no fine cell with 2 valid steps")
        self.weights[var] = _f32(weights.reshape(fy, fx, -1))

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(arrays, JSON description): what a checkpoint stores beside its networks (a model conditioned on
        this regression needs it at inference); :meth:`from_checkpoint` reads them back exactly."""
        arrays: dict[str, torch.Tensor] = {}
        for kind, table in (
            ("weights", self.weights),
            ("residual_climatology", self.residual_climatology),
            ("coarse_climatology", self.coarse_climatology),
        ):
            for name, values in table.items():
                arrays[f"{ARRAY_PREFIX}/{kind}/{name}"] = torch.from_numpy(
                    np.ascontiguousarray(values, np.float32)
                )
        description = {
            "method": "local_regression",
            "definition": "bilinear + residual climatology of the calendar month + ridge regression per fine cell "
            "on the standardised coarse anomalies of the (2 halo + 1)^2 surrounding coarse cells (training times "
            "only)",
            "variables": list(self.variables),
            "predictors": {k: list(v) for k, v in self.predictors.items()},
            "halo": self.halo,
            "ridge": dict(self.ridge),
            "min_values": self.min_values,
            "coarse_grid": _grid_record(self.coarse_grid),
            "fine_grid": _grid_record(self.fine_grid),
            "windows": {str(m): list(w) for m, w in self.windows.items()},
            "coarse_scale": dict(self.coarse_scale),
        }
        return arrays, description

    @classmethod
    def from_checkpoint(cls, arrays: dict[str, torch.Tensor], description: dict[str, Any]) -> LocalRegression:
        """The regression stored by :meth:`to_checkpoint`; BaselineError naming what is missing."""

        def table(kind: str, names: Sequence[str]) -> dict[str, np.ndarray]:
            keys = {n: f"{ARRAY_PREFIX}/{kind}/{n}" for n in names}
            missing = [k for k in keys.values() if k not in arrays]
            if missing:
                raise BaselineError(
                    f"the checkpoint describes a local-regression first guess but lacks {missing}"
                )
            return {n: arrays[k].numpy().astype(np.float64) for n, k in keys.items()}

        variables = list(description["variables"])
        predictors = {k: list(v) for k, v in description["predictors"].items()}
        used = sorted({p for v in variables for p in predictors[v]})
        return cls(
            variables,
            predictors,
            int(description["halo"]),
            ridge=dict(description["ridge"]),
            min_values=int(description["min_values"]),
            coarse_grid=Grid(**description["coarse_grid"]),
            fine_grid=Grid(**description["fine_grid"]),
            windows={int(m): tuple(w) for m, w in description["windows"].items()},
            coarse_climatology=table("coarse_climatology", used),
            coarse_scale={k: float(v) for k, v in description["coarse_scale"].items()},
            residual_climatology=table("residual_climatology", variables),
            weights=table("weights", variables),
        )

    def first_guess(
        self, coarse_fine: xr.Dataset, coarse: xr.Dataset, variables: Sequence[str] | None = None
    ) -> xr.Dataset:
        """``coarse_fine`` (the coarse input bilinearly on the fine grid) plus the predicted residual of each
        of ``variables`` (default all fitted) from ``coarse`` (on the fitted coarse grid): what a network
        conditioned on this regression sees as its ``<var>_coarse`` planes, in training and at inference
        alike. Cells the regression leaves NaN (never valid in training) keep the bilinear value.

        A coarse input on another grid (a reconstruction's unified grid, shifted against the training's
        blocks) is first averaged conservatively onto the fitted coarse grid, which it must cover (RegridError
        otherwise); the fine grid must be the fitted one (the caller checks)."""
        variables = list(self.variables if variables is None else variables)
        if not _as_grid(coarse, "coarse input").same_cells(self.coarse_grid):
            used = sorted({p for v in variables for p in self.predictors[v]})
            coarse = regrid.conservative(
                coarse[used], self.coarse_grid, name="coarse input of the first guess"
            )
        coarse = coarse.assign_coords(lat=self.coarse_grid.lat, lon=self.coarse_grid.lon)
        residual = self.residual(coarse, coarse["time"].dt.month.values, variables)
        out = coarse_fine.copy()
        for v in variables:
            add = np.nan_to_num(residual[v], nan=0.0).astype(np.float32)
            out[v] = (coarse_fine[v].transpose("time", "lat", "lon") + add).astype("float32")
        return out

    # -- predict --------------------------------------------------------------------------------------------
    def residual(
        self, coarse: xr.Dataset, months: np.ndarray, variables: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Predicted fine-minus-bilinear residual of ``variables`` (default all fitted), (time, fy, fx), for
        coarse fields on the fitted coarse grid at calendar ``months``."""
        variables = list(self.variables if variables is None else variables)
        used = sorted({p for v in variables for p in self.predictors[v]})
        anomalies = self._anomalies(_float64(coarse[used]), months, used)
        fy, fx = self.fine_grid.nlat, self.fine_grid.nlon
        groups = self._groups()
        out = {}
        for var in variables:
            w = self.weights[var].reshape(fy * fx, -1)
            pred = np.empty((len(months), fy * fx))
            for cy, cx, cells in groups:
                pred[:, cells] = self._design(anomalies, self.predictors[var], cy, cx) @ w[cells].T
            out[var] = pred.reshape(-1, fy, fx) + self.residual_climatology[var][months - 1]
        return out


def _f32(values: np.ndarray) -> np.ndarray:
    """``values`` at float32 precision (held as float64): what a checkpoint stores, so a model fitted in
    training predicts exactly what the stored one predicts at inference."""
    return np.asarray(values, np.float32).astype(np.float64)


def _monthly(da: xr.DataArray, windows: dict[int, tuple[int, ...]]) -> np.ndarray:
    """(12, lat, lon) mean of ``da`` per calendar month over each month's pooling window (NaN skipped);
    months never fitted are NaN (downscaling them raises first)."""
    months = da["time"].dt.month.values
    values = np.asarray(da.transpose("time", ...).values, np.float64)
    out = np.full((12, *values.shape[1:]), np.nan)
    with warnings.catch_warnings():  # a cell never valid in a window stays NaN, silently
        warnings.simplefilter("ignore", RuntimeWarning)
        for month, window in windows.items():
            out[month - 1] = np.nanmean(values[np.isin(months, window)], axis=0)
    return out


@dataclass
class LocalRegressionDownscaler(_Baseline):
    """The method of the registry around :class:`LocalRegression` (deterministic, identical members)."""

    halo: int = 2
    predictors: dict[str, list[str]] | None = None
    ridge: float | None = None
    min_values: int = 2
    name: str = "local_regression"
    needs: ClassVar[Needs] = Needs(fit=True)
    summary: ClassVar[str] = (
        "bilinear + residual climatology + ridge regression per fine cell on the surrounding coarse anomalies"
    )
    model: LocalRegression | None = field(default=None, repr=False)

    @property
    def config(self) -> MethodConfig:
        return LocalRegressionConfig(
            halo=self.halo, predictors=self.predictors, ridge=self.ridge, min_values=self.min_values
        )

    def fit(self, coarse_train: xr.Dataset, fine_train: xr.Dataset) -> LocalRegressionDownscaler:
        where = f"{self.name} fit"
        names = [str(v) for v in _common_variables(coarse_train, fine_train, where)]
        predictors = {v: list(names) for v in names} if self.predictors is None else dict(self.predictors)
        unknown = sorted(set(predictors) - set(names))
        if unknown:
            raise BaselineError(
                f"{where}: predictors given for {unknown}, which are not variables of both the coarse and the "
                f"fine training data ({names})"
            )
        for v in names:
            predictors.setdefault(v, list(names))
        self.model = LocalRegression(
            names, predictors, self.halo, fixed_ridge=self.ridge, min_values=self.min_values
        ).fit(coarse_train, fine_train, where)
        return self

    def downscale(self, inputs: Inputs, members: int | Sequence[int] = 1, seed: int = 0) -> xr.Dataset:
        coarse = self._coarse(inputs)
        model = self.model
        if model is None:
            raise BaselineError(f"{self.name}: call fit(coarse_train, fine_train) before downscale")
        grid = _as_grid(inputs.grid, f"{self.name} target")
        if not _same_grid(grid, model.fine_grid):
            raise BaselineError(
                f"{self.name}: target {grid.describe()} is not the grid fitted on ({model.fine_grid.describe()})"
            )
        if not _same_grid(_as_grid(coarse, f"{self.name} coarse"), model.coarse_grid):
            raise BaselineError(
                f"{self.name}: coarse input is not on the grid fitted on ({model.coarse_grid.describe()})"
            )
        names: list[Hashable] = [v for v in gridded_variables(coarse) if v in model.variables]
        absent = [str(v) for v in model.variables if v not in names]
        needed = sorted(
            {p for v in names for p in model.predictors[str(v)]} - set(map(str, coarse.data_vars))
        )
        if not names or needed:
            raise BaselineError(
                f"{self.name}: the coarse input lacks predictor variable(s) {needed or absent}; fitted with "
                f"predictors {model.predictors}"
            )
        _check_months(coarse, np.array(sorted(model.windows)), f"{self.name} downscale")
        coarse = coarse.assign_coords(lat=model.coarse_grid.lat, lon=model.coarse_grid.lon)
        months = coarse["time"].dt.month.values
        residual = model.residual(coarse, months, [str(v) for v in names])
        interpolated = _bilinear_skipna(_float64(coarse[names + _others(coarse)]), grid)
        out = interpolated.copy()
        for var in names:
            b = interpolated[var].transpose("time", "lat", "lon")
            combined = b + xr.DataArray(residual[str(var)], dims=("time", "lat", "lon"), coords=b.coords)
            if var in MULTIPLICATIVE_VARIABLES:
                combined = combined.clip(min=0.0)
            out[var] = (
                combined.transpose(*interpolated[var].dims).astype("float32").assign_attrs(coarse[var].attrs)
            )
        return _with_members(out, members, self.name, _pooled(model.windows))


def _register() -> None:
    from climrecon.methods import register

    register(
        LocalRegressionConfig,
        lambda cfg, sampler: LocalRegressionDownscaler(cfg.halo, cfg.predictors, cfg.ridge, cfg.min_values),
        LocalRegressionDownscaler.summary,
        needs="coarse fields; paired training years; any factor",
    )


_register()
