"""Provenance facts every stage records: code version, time, a CF ``history`` line, and a W3C PROV document.

Secrets never get here: callers pass configs through :func:`climrecon.storage.redact` (done by
:func:`stage_attrs`; :func:`stage_record`, :func:`prov_document` and :func:`write_prov_document` use
:func:`climrecon.storage.redact`; store identities are recorded under ``content_key``).

Lineage records (the ``climrecon_provenance`` attribute of a store) are plain JSON, one per stage, made
by :func:`stage_record`::

    {"stage": "aggregate", "store": url, "content_key": key, "config": {...}, "config_hash": ...,
     "started": iso, "ended": iso, "code_version": ..., "hardware": {...}, "prefect": {...} | null,
     "inputs": [{"store": url, "content_key": key}, ...], "upstream": <the input store's own record>, ...extra}

A stage carries its input's record forward under ``upstream`` (records nest back to the catalog).
:func:`prov_document` turns such a chain into a W3C PROV-JSON document (https://www.w3.org/Submission/
prov-json/). It reads records leniently, because stages written by others may name things differently:
any mapping with a ``stage`` is an activity; any mapping with a store URL (``store``/``url``/``zstore``)
is an entity (a stage store when it also has a ``content_key``); catalog ``rows`` and ``source_files`` become
source-file entities; any ``flow_run_id`` becomes a Prefect agent; nested records under any other key
are followed, so whatever an upstream stage recorded reaches the document.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import climrecon
from climrecon.storage import redact

__all__ = [
    "PROV_NAMESPACE",
    "code_version",
    "utc_now",
    "history_line",
    "stage_attrs",
    "hardware",
    "prefect_run_context",
    "config_hash",
    "stage_record",
    "prov_document",
    "prov_summary",
    "write_prov_document",
]

PROV_NAMESPACE = "https://climrecon.example.org/ns/prov#"  # the ``climrecon:`` prefix of PROV ids


@cache
def code_version() -> str:
    """``climrecon <version>`` plus the git commit (and ``-dirty``) when running from a checkout."""
    root = Path(__file__).resolve().parent.parent
    commit = ""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"climrecon {climrecon.__version__}" + (f" (git {commit})" if commit else "")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def history_line(stage: str, detail: str) -> str:
    """One CF ``history`` entry: ``<UTC time> climrecon <version> <stage>: <detail>``."""
    return f"{utc_now()} {code_version()} {stage}: {detail}"


def stage_attrs(
    stage: str, config: Any, key: str, previous_history: str = "", **extra: Any
) -> dict[str, str]:
    """Attributes a stage writes on its output store (JSON-encoded where structured, secrets redacted)."""
    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    history = "\n".join(h for h in (previous_history, history_line(stage, f"key {key}")) if h)
    attrs = {
        f"climrecon_{stage}_config": json.dumps(redact(cfg), sort_keys=True, default=str),
        "climrecon_code_version": code_version(),
        "history": history,
    }
    attrs.update(
        {
            f"climrecon_{k}": v if isinstance(v, str) else json.dumps(redact(v), default=str)
            for k, v in extra.items()
        }
    )
    return attrs


# -- facts about the run -----------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _gpus() -> list[str]:
    """GPU names: from torch.cuda when torch is already loaded, else from ``nvidia-smi`` when on PATH.

    torch is not imported just for this: in an aggregate or catalog worker that costs ~1 s and a few
    hundred MB of memory for a fact ``nvidia-smi`` gives as well.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            return []
        except Exception:  # noqa: BLE001 - a broken CUDA install is "no GPU" for the record
            return []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            return [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            return []
    return []


@cache
def hardware() -> dict[str, Any]:
    """The machine this process runs on: host, CPU model, logical cores, memory, GPU names and count."""
    gpus = _gpus()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "gpu_count": len(gpus),
        "gpu_names": gpus,
    }


def prefect_run_context() -> dict[str, str] | None:
    """``{flow_run_id, flow_run_name, flow_name, task_run_id, task_run_name}`` inside Prefect, else None.

    Prefect is never imported here: outside a Prefect process (a plain library call) this is None.
    """
    if "prefect" not in sys.modules:
        return None
    from prefect.context import FlowRunContext, TaskRunContext

    flow_ctx, task_ctx = FlowRunContext.get(), TaskRunContext.get()
    out: dict[str, str] = {}
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        out.update(flow_run_id=str(flow_ctx.flow_run.id), flow_run_name=str(flow_ctx.flow_run.name))
        if flow_ctx.flow is not None:
            out["flow_name"] = str(flow_ctx.flow.name)
    if task_ctx is not None and task_ctx.task_run is not None:
        out.update(task_run_id=str(task_ctx.task_run.id), task_run_name=str(task_ctx.task_run.name))
        if "flow_run_id" not in out and task_ctx.task_run.flow_run_id is not None:
            out["flow_run_id"] = str(task_ctx.task_run.flow_run_id)
    return out or None


def config_hash(config: Any) -> str:
    """The content key of a (redacted) config: equal configs hash equal, whatever their key order."""
    from climrecon.stores import content_key

    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    return content_key(redact(cfg))


def stage_record(
    stage: str,
    *,
    store: str,
    key: str,
    config: Any,
    started: str,
    ended: str | None = None,
    inputs: Iterable[Mapping[str, Any]] = (),
    upstream: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """One stage's lineage record (see the module docstring), secrets redacted."""
    cfg = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    record = {
        "stage": stage,
        "store": store,
        "content_key": key,
        "config": cfg,
        "config_hash": config_hash(cfg),
        "started": started,
        "ended": ended or utc_now(),
        "code_version": code_version(),
        "hardware": hardware(),
        "prefect": prefect_run_context(),
        "inputs": [dict(i) for i in inputs],
        **extra,
    }
    if upstream is not None:
        record["upstream"] = upstream
    return redact(json.loads(json.dumps(record, default=str)))


# -- W3C PROV-JSON ----------------------------------------------------------------------------------------
_STORE_KEYS = ("store", "url", "zstore", "store_url")
_START_KEYS = ("started", "start_time", "start", "startTime")
_END_KEYS = ("ended", "end_time", "end", "endTime")
_FILE_LIST_KEYS = ("source_files", "files", "paths")


def _short(text: str) -> str:
    from climrecon.stores import content_key

    return content_key(text, length=12)


class _ProvBuilder:
    """Accumulates PROV-JSON sections; ids are stable (derived from URLs, keys and run ids)."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {
            "prefix": {
                "climrecon": PROV_NAMESPACE,
                "prov": "http://www.w3.org/ns/prov#",
                "xsd": "http://www.w3.org/2001/XMLSchema#",
            },
            "entity": {},
            "activity": {},
            "agent": {},
            "used": {},
            "wasGeneratedBy": {},
            "wasAssociatedWith": {},
            "wasDerivedFrom": {},
        }

    def _relation(self, kind: str, **terms: str) -> None:
        section = self.doc[kind]
        if terms not in section.values():
            section[f"_:{kind}{len(section) + 1}"] = {f"prov:{k}": v for k, v in terms.items()}

    def entity(self, ident: str, attrs: dict[str, Any]) -> str:
        self.doc["entity"].setdefault(ident, {}).update(
            {k: v for k, v in attrs.items() if v not in (None, "")}
        )
        return ident

    def store_entity(self, node: Mapping[str, Any]) -> str:
        url = next(str(node[k]) for k in _STORE_KEYS if node.get(k))
        key = node.get("content_key")
        ident = f"climrecon:store/{key}" if key else f"climrecon:file/{_short(url)}"
        return self.entity(
            ident,
            {
                "prov:type": "climrecon:ZarrStore"
                if key or url.rstrip("/").endswith(".zarr")
                else "climrecon:SourceFile",
                "prov:location": url,
                "climrecon:key": key,
            },
        )

    def file_entity(self, path: str, attrs: Mapping[str, Any] | None = None) -> str:
        extra = {
            f"climrecon:{k}": (v if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str))
            for k, v in (attrs or {}).items()
            if k not in _STORE_KEYS and k != "path"
        }
        return self.entity(
            f"climrecon:file/{_short(path)}",
            {"prov:type": "climrecon:SourceFile", "prov:location": path, **extra},
        )

    def agent(self, ident: str, attrs: dict[str, Any]) -> str:
        self.doc["agent"].setdefault(ident, {}).update(
            {k: v for k, v in attrs.items() if v not in (None, "")}
        )
        return ident

    def add_record(self, rec: Mapping[str, Any]) -> str | None:
        """Add one stage record (and, recursively, everything it names); the id of its output entity."""
        stage = str(rec.get("stage", "stage"))
        output = self.store_entity(rec) if any(rec.get(k) for k in _STORE_KEYS) else None
        act_id = f"climrecon:{stage}/{rec.get('content_key') or _short(json.dumps(rec, sort_keys=True, default=str))}"
        cfg = rec.get("config")
        act = {
            "prov:type": f"climrecon:{stage}",
            "prov:label": f"climrecon {stage} stage",
            "prov:startTime": next((rec[k] for k in _START_KEYS if rec.get(k)), None),
            "prov:endTime": next((rec[k] for k in _END_KEYS if rec.get(k)), None),
            "climrecon:config_hash": rec.get("config_hash") or (config_hash(cfg) if cfg else None),
            "climrecon:config": json.dumps(cfg, sort_keys=True, default=str) if cfg else None,
            "climrecon:hardware": json.dumps(rec["hardware"], sort_keys=True)
            if rec.get("hardware")
            else None,
        }
        self.doc["activity"].setdefault(act_id, {}).update({k: v for k, v in act.items() if v is not None})
        if output:
            self._relation("wasGeneratedBy", entity=output, activity=act_id)
        if rec.get("code_version"):
            code = self.agent(
                f"climrecon:software/{_short(str(rec['code_version']))}",
                {"prov:type": "prov:SoftwareAgent", "prov:label": str(rec["code_version"])},
            )
            self._relation("wasAssociatedWith", activity=act_id, agent=code)
        for used in self._inputs(rec):
            self._relation("used", activity=act_id, entity=used)
            if output and used != output:
                self._relation("wasDerivedFrom", generatedEntity=output, usedEntity=used)
        self._prefect_agents(rec, act_id)
        return output

    def _inputs(self, rec: Mapping[str, Any]) -> list[str]:
        """Entities ``rec`` used: its inputs, catalog rows, source files, checkpoints, upstream records."""
        found: list[str] = []
        for k, v in rec.items():
            if k in ("config", "hardware", "prefect", *_STORE_KEYS):
                continue
            found.extend(self._walk(k, v))
        return list(dict.fromkeys(found))

    def _walk(self, name: str, value: Any) -> list[str]:
        if isinstance(value, str) and name == "catalog" and value:
            return [self.file_entity(value, {"role": "catalog"})]
        if isinstance(value, str) and name in ("source", "source_store") and value:
            return [self.store_entity({"store": value})]
        if isinstance(value, (list, tuple)):
            if name in _FILE_LIST_KEYS:
                return [self.file_entity(str(p)) for p in value if isinstance(p, str) and p]
            return [e for item in value for e in self._walk(name, item)]
        if not isinstance(value, Mapping):
            return []
        if "stage" in value:  # an upstream stage's own record
            out = self.add_record(value)
            return [out] if out else []
        if value.get("path") and not any(value.get(k) for k in _STORE_KEYS):  # a catalog row
            return [self.file_entity(str(value["path"]), value)]
        if any(value.get(k) for k in _STORE_KEYS):  # a store, checkpoint or file reference
            ent = self.store_entity(value)
            extra = {
                f"climrecon:{k}": v
                for k, v in value.items()
                if k not in (*_STORE_KEYS, "content_key") and isinstance(v, (str, int, float, bool))
            }
            self.entity(ent, extra)
            return [
                ent,
                *self._inputs({k: v for k, v in value.items() if not isinstance(v, (str, int, float, bool))}),
            ]
        if value.get("hash") or value.get("sha256"):  # e.g. a checkpoint given by its hash
            digest = str(value.get("hash") or value.get("sha256"))
            scalars = {
                f"climrecon:{k}": v for k, v in value.items() if isinstance(v, (str, int, float, bool))
            }
            return [
                self.entity(f"climrecon:{name}/{digest[:16]}", {"prov:type": f"climrecon:{name}", **scalars})
            ]
        return [
            e
            for k, v in value.items()
            if k not in ("config", "hardware", "prefect")
            for e in self._walk(k, v)
        ]

    def _prefect_agents(self, node: Any, act_id: str) -> None:
        """Every ``flow_run_id`` in this record (not in its upstream records) as an associated agent."""
        if isinstance(node, Mapping):
            if node.get("flow_run_id"):
                run = str(node["flow_run_id"])
                agent = self.agent(
                    f"climrecon:prefect-flow-run/{run}",
                    {
                        "prov:type": "climrecon:PrefectFlowRun",
                        "prov:label": str(node.get("flow_run_name") or node.get("flow_name") or run),
                        "climrecon:flow_name": node.get("flow_name"),
                        "climrecon:task_run_id": node.get("task_run_id"),
                    },
                )
                self._relation("wasAssociatedWith", activity=act_id, agent=agent)
            for v in node.values():
                if not (isinstance(v, Mapping) and "stage" in v):  # upstream records have their own
                    self._prefect_agents(v, act_id)
        elif isinstance(node, (list, tuple)):
            for v in node:
                if not (isinstance(v, Mapping) and "stage" in v):
                    self._prefect_agents(v, act_id)


def prov_document(record: Mapping[str, Any]) -> dict[str, Any]:
    """The W3C PROV-JSON document of a stage record and everything upstream of it (secrets redacted).

    Entities: catalogs and source files (catalog rows), every stage store (id ``climrecon:store/<key>``,
    ``prov:location`` its URL), checkpoints. Activities: every stage (``climrecon:<stage>/<key>``) with
    start/end times, config and its hash, hardware. Agents: the climrecon code version (a
    ``prov:SoftwareAgent``) and every Prefect flow run. Relations: used, wasGeneratedBy,
    wasAssociatedWith, wasDerivedFrom.
    """
    builder = _ProvBuilder()
    builder.add_record(redact(json.loads(json.dumps(record, default=str))))
    return {k: v for k, v in builder.doc.items() if v or k == "prefix"}


def prov_summary(doc: Mapping[str, Any]) -> dict[str, str]:
    """Attributes summarising a PROV document: the lineage of stages (oldest first) and counts."""
    acts = doc.get("activity", {})
    ordered = sorted(acts.items(), key=lambda kv: str(kv[1].get("prov:startTime", "")))
    lineage = " -> ".join(a.split(":", 1)[1] for a, _ in ordered)
    files = [e for e, v in doc.get("entity", {}).items() if v.get("prov:type") == "climrecon:SourceFile"]
    runs = sorted(
        a.rsplit("/", 1)[1]
        for a, v in doc.get("agent", {}).items()
        if v.get("prov:type") == "climrecon:PrefectFlowRun"
    )
    return {
        "climrecon_lineage": lineage,
        "climrecon_prov_counts": json.dumps(
            {k: len(doc.get(k, {})) for k in ("entity", "activity", "agent")}
        ),
        "climrecon_source_file_count": str(len(files)),
        "climrecon_prefect_flow_runs": json.dumps(runs),
    }


def write_prov_document(
    store_url: str,
    doc: Mapping[str, Any],
    storage_options: dict[str, Any] | None = None,
    name: str = "provenance.json",
) -> str:
    """Put ``doc`` as ``<store_url>/<name>`` (beside the Zarr metadata); returns that object's URL."""
    from climrecon.storage import filesystem, join_url

    fs, path = filesystem(store_url, storage_options)
    fs.makedirs(path, exist_ok=True)
    fs.pipe(join_url(path, name), (json.dumps(redact(dict(doc)), indent=1, sort_keys=True) + "\n").encode())
    return join_url(store_url, name)
