"""Downscaling methods: one module per method behind one interface (:mod:`climrecon.methods.base`), and
the registry that stages, flows, benchmarks and the CLI go through.

    from climrecon import methods
    cfg = methods.parse_config("bcsd")             # or {"name": "dpdm", "checkpoint": "..."}
    method = methods.build(cfg, sampler)           # a Method: fit / validate / downscale / describe
    methods.METHODS                                # name -> MethodEntry (config type, builder, summary)

A new method is one module that defines its config (a :class:`MethodConfig` subclass with
``name: Literal["mine"] = "mine"``) and its class, and calls :func:`register` (see README "Methods"); an
installed package makes it known in every process with an entry point of group ``climrecon.methods``.
Stages never import a method module: only this package (import-linter keeps it so).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from climrecon.methods.base import (
    Inputs,
    Method,
    MethodConfig,
    MethodError,
    Needs,
    SamplerConfig,
    gridded_variables,
    item_seeds,
    member_indices,
    month_index,
    month_starts,
    time_index,
)

__all__ = [
    "METHODS",
    "MethodEntry",
    "register",
    "unregister",
    "parse_config",
    "build",
    "Inputs",
    "Method",
    "MethodConfig",
    "MethodError",
    "Needs",
    "SamplerConfig",
    "gridded_variables",
    "item_seeds",
    "member_indices",
    "month_index",
    "month_starts",
    "time_index",
]


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its config type, how to build it, a one-line summary and what it needs."""

    name: str
    config: type[MethodConfig]
    build: Callable[[MethodConfig, SamplerConfig], Method]
    summary: str
    needs: str = ""  # human-readable, for the README table and `climrecon methods`
    train: Callable[..., Any] | None = None  # train(cfg: ClimReconConfig, *, progress, log) -> TrainResult
    distill: Callable[..., Any] | None = None  # like train, for cfg.train.distill (a few-step student)


METHODS: dict[str, MethodEntry] = {}


def register(
    config: type[MethodConfig],
    build: Callable[[MethodConfig, SamplerConfig], Method],
    summary: str,
    needs: str = "",
    train: Callable[..., Any] | None = None,
    distill: Callable[..., Any] | None = None,
) -> MethodEntry:
    """Add a method (its name is the default of ``config.name``); re-registering a name replaces it."""
    name = config.model_fields["name"].default
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"{config.__name__}.name needs a default (the registry key), e.g. name: Literal['x'] = 'x'"
        )
    entry = MethodEntry(name, config, build, summary, needs, train, distill)
    METHODS[name] = entry
    return entry


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def parse_config(raw: str | Mapping[str, Any] | MethodConfig) -> MethodConfig:
    """A method's validated config from its name, a mapping with ``name``, or a config instance."""
    if isinstance(raw, MethodConfig):
        if type(raw) is MethodConfig:
            raw = raw.model_dump()
        else:
            return raw
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping) or "name" not in raw:
        raise ValueError(f"a method is a registered name or a mapping with 'name:'; known: {sorted(METHODS)}")
    entry = METHODS.get(str(raw["name"]))
    if entry is None:
        raise ValueError(f"unknown method {raw['name']!r}; registered methods: {sorted(METHODS)}")
    return entry.config.model_validate(dict(raw))


def build(config: str | Mapping[str, Any] | MethodConfig, sampler: SamplerConfig | None = None) -> Method:
    """The method ``config`` names, built with ``sampler`` (defaults when None)."""
    try:
        cfg = parse_config(config)
    except ValidationError as exc:
        raise MethodError(f"invalid method config: {exc}") from None
    except ValueError as exc:
        raise MethodError(str(exc)) from None
    return METHODS[cfg.name].build(cfg, sampler or SamplerConfig())


def _register_builtins() -> None:
    """The methods shipped here, then those of installed packages (entry points of group
    ``climrecon.methods``: importing the module registers it, in every process, Dask workers included)."""
    from importlib.metadata import entry_points

    from climrecon.methods import (  # noqa: F401  (each registers)
        baselines,
        corrdiff,
        dpdm,
        local_regression,
        spatiotemporal,
        zssd,
    )

    for ep in entry_points(group="climrecon.methods"):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - name the plugin that failed, keep the built-in methods
            raise MethodError(f"method plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc


_register_builtins()
