"""Dask cluster recipes: a small YAML file says where Dask computes, from a laptop to SLURM or Kubernetes.

Three kinds (examples in deploy/dask/):

- ``existing``: ``address: tcp://host:8786`` of a scheduler someone already runs (``${VAR}`` is expanded
  from the environment, e.g. ``address: ${DASK_SCHEDULER_ADDRESS}``).
- ``slurm``: ``cluster:`` holds the keyword arguments of ``dask_jobqueue.SLURMCluster`` (``cores`` and
  ``memory`` required); ``scale: {jobs: N}`` or ``adapt: {minimum: 0, maximum: N}`` (in jobs).
- ``kubernetes``: ``cluster:`` holds the keyword arguments of ``dask_kubernetes.operator.KubeCluster``
  (``image`` required); optional ``worker_groups:`` (each passed to ``cluster.add_worker_group``, e.g.
  a GPU group), ``scale: {workers: N}`` or ``adapt``.

dask-jobqueue and dask-kubernetes are optional: they are imported only when such a recipe starts a
cluster, and a missing one raises :class:`RecipeError` naming the package to install. Flows take the
resulting scheduler address as their ``scheduler_address`` parameter::

    with recipe_client("deploy/dask/slurm-jobqueue.yaml") as client:
        reconstruct_flow(scheduler_address=client.scheduler.address)
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

__all__ = [
    "RecipeError",
    "ExistingScheduler",
    "SlurmCluster",
    "KubernetesCluster",
    "ClusterRecipe",
    "parse_recipe",
    "load_recipe",
    "validate_scheduler_address",
    "start_cluster",
    "recipe_client",
]

SCHEDULER_SCHEMES = ("tcp", "tls", "ucx", "ws", "wss")


class RecipeError(ValueError):
    """A cluster recipe is invalid or cannot start; the message names the file, key or package at fault."""


def validate_scheduler_address(address: str) -> str:
    """``address`` if it is a Dask scheduler address ``scheme://host:port`` (tcp, tls, ucx, ws, wss)."""
    match = re.fullmatch(
        r"(?P<scheme>[a-z]+)://(?P<host>\[[0-9a-fA-F:]+\]|[^:/\s]+):(?P<port>\d{1,5})/?", address
    )
    if not match:
        raise ValueError(f"scheduler address {address!r} is not of the form tcp://host:port")
    if match["scheme"] not in SCHEDULER_SCHEMES:
        raise ValueError(
            f"scheduler address {address!r}: scheme must be one of {', '.join(SCHEDULER_SCHEMES)}"
        )
    if not 0 < int(match["port"]) < 65536:
        raise ValueError(f"scheduler address {address!r}: port out of range")
    return address


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Adapt(_Model):
    """Adaptive scaling bounds (jobs for SLURM, workers for Kubernetes)."""

    minimum: int = Field(0, ge=0)
    maximum: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Adapt:
        if self.maximum < self.minimum:
            raise ValueError(f"maximum ({self.maximum}) is below minimum ({self.minimum})")
        return self


class ExistingScheduler(_Model):
    kind: Literal["existing"]
    address: str

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        expanded = os.path.expandvars(v)
        if "$" in expanded:
            raise ValueError(f"{v!r} names an environment variable that is not set")
        return validate_scheduler_address(expanded)


class _Scaled(_Model):
    adapt: Adapt | None = None

    def _check_one_scaling(self, scale: object) -> None:
        if scale is not None and self.adapt is not None:
            raise ValueError("give either scale or adapt, not both")


class SlurmScale(_Model):
    jobs: int = Field(ge=1)


class SlurmCluster(_Scaled):
    kind: Literal["slurm"]
    cluster: dict[str, Any] = Field(description="keyword arguments of dask_jobqueue.SLURMCluster")
    scale: SlurmScale | None = None

    @model_validator(mode="after")
    def _check(self) -> SlurmCluster:
        missing = [k for k in ("cores", "memory") if k not in self.cluster]
        if missing:
            raise ValueError(f"cluster is missing {missing} (SLURMCluster needs cores and memory per job)")
        self._check_one_scaling(self.scale)
        return self


class KubernetesScale(_Model):
    workers: int = Field(ge=1)


class WorkerGroup(_Model):
    """Keyword arguments of ``KubeCluster.add_worker_group`` (e.g. a group of GPU workers)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str
    n_workers: int = Field(1, ge=0)


class KubernetesCluster(_Scaled):
    kind: Literal["kubernetes"]
    cluster: dict[str, Any] = Field(description="keyword arguments of dask_kubernetes.operator.KubeCluster")
    worker_groups: list[WorkerGroup] = Field(default_factory=list)
    scale: KubernetesScale | None = None

    @model_validator(mode="after")
    def _check(self) -> KubernetesCluster:
        if "image" not in self.cluster:
            raise ValueError(
                "cluster is missing ['image'] (the worker image, e.g. deploy/docker/Dockerfile.gpu)"
            )
        self._check_one_scaling(self.scale)
        return self


ClusterRecipe = Annotated[ExistingScheduler | SlurmCluster | KubernetesCluster, Field(discriminator="kind")]
_RECIPE = TypeAdapter(ClusterRecipe)


def parse_recipe(raw: Any, source: str = "recipe") -> ExistingScheduler | SlurmCluster | KubernetesCluster:
    """Validate a recipe mapping; :class:`RecipeError` names ``source`` and each dotted key at fault."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source} must hold a mapping at the top level, not {type(raw).__name__}")
    if raw.get("kind") not in ("existing", "slurm", "kubernetes"):
        raise RecipeError(
            f"{source}: kind must be one of existing, slurm, kubernetes (got {raw.get('kind')!r})"
        )
    try:
        return _RECIPE.validate_python(raw)
    except ValidationError as exc:
        lines = [f"invalid cluster recipe {source}:"]
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"][1:]) or "(top level)"  # loc[0] is the kind tag
            msg = "unknown key (not allowed here)" if e["type"] == "extra_forbidden" else e["msg"]
            lines.append(f"  {loc}: {msg}")
        raise RecipeError("\n".join(lines)) from None


def load_recipe(path: str | Path) -> ExistingScheduler | SlurmCluster | KubernetesCluster:
    """Read and validate a recipe YAML file (see the module docstring for its keys)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"cluster recipe {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"cluster recipe {p} is not valid YAML: {exc}") from None
    return parse_recipe(raw, str(p))


def _optional_import(module: str, package: str, kind: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RecipeError(
            f"a {kind} cluster recipe needs the {package!r} package, which is not installed: "
            f"pip install {package}  ({exc})"
        ) from None


def start_cluster(recipe: ExistingScheduler | SlurmCluster | KubernetesCluster) -> tuple[Any, str]:
    """Start what the recipe describes; return ``(cluster or None, scheduler address)``.

    ``existing`` starts nothing (``None``). For SLURM and Kubernetes the caller owns the returned cluster
    and closes it (:func:`recipe_client` does).
    """
    if isinstance(recipe, ExistingScheduler):
        return None, recipe.address
    if isinstance(recipe, SlurmCluster):
        jobqueue = _optional_import("dask_jobqueue", "dask-jobqueue", "slurm")
        cluster = jobqueue.SLURMCluster(**recipe.cluster)
        if recipe.adapt:
            cluster.adapt(minimum_jobs=recipe.adapt.minimum, maximum_jobs=recipe.adapt.maximum)
        elif recipe.scale:
            cluster.scale(jobs=recipe.scale.jobs)
        return cluster, cluster.scheduler_address
    operator = _optional_import("dask_kubernetes.operator", "dask-kubernetes", "kubernetes")
    cluster = operator.KubeCluster(**recipe.cluster)
    for group in recipe.worker_groups:
        cluster.add_worker_group(**group.model_dump())
    if recipe.adapt:
        cluster.adapt(minimum=recipe.adapt.minimum, maximum=recipe.adapt.maximum)
    elif recipe.scale:
        cluster.scale(recipe.scale.workers)
    return cluster, cluster.scheduler_address


@contextmanager
def recipe_client(recipe: str | Path | ExistingScheduler | SlurmCluster | KubernetesCluster) -> Iterator[Any]:
    """A ``distributed.Client`` (set as default) on the recipe's cluster; a started cluster is closed on exit."""
    from distributed import Client

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(recipe)
    cluster, address = start_cluster(recipe)
    try:
        with Client(address, set_as_default=True) as client:
            yield client
    finally:
        if cluster is not None:
            cluster.close()
