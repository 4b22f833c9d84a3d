"""Fast checks of everything under deploy/ that cannot run here: prefect.yaml, work-pool templates,
Dockerfiles, Dask cluster recipes, and the small pure parts of flows/server.py.

Templates are checked with Prefect's own validators (the server's base-job-template check, the worker's
job configuration classes where installed) and rendered with ``prefect.utilities.templating.apply_values``
exactly as a worker does, to see the GPU variables land where Docker and Kubernetes read them.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from climrecon.flows.cluster_recipes import (
    ExistingScheduler,
    KubernetesCluster,
    RecipeError,
    SlurmCluster,
    load_recipe,
    parse_recipe,
    recipe_client,
    start_cluster,
    validate_scheduler_address,
)
from climrecon.flows.server import PrefectServerError, client_environment, free_port, wait_until_healthy
from climrecon.storage import SECRET_OPTION_KEYS

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
PREFECT_YAML = DEPLOY / "prefect.yaml"
POOL_TEMPLATES = {
    "climrecon-process": DEPLOY / "work-pools" / "process.json",
    "climrecon-docker-gpu": DEPLOY / "work-pools" / "docker.json",
    "climrecon-kubernetes-gpu": DEPLOY / "work-pools" / "kubernetes.json",
}
CONTAINER_PROJECT_DIR = "/opt/climrecon"


def prefect_yaml() -> dict[str, Any]:
    return yaml.safe_load(PREFECT_YAML.read_text())


DEPLOYMENTS = prefect_yaml()["deployments"]


def template(name: str) -> dict[str, Any]:
    return json.loads((DEPLOY / "work-pools" / f"{name}.json").read_text())


def render(tmpl: dict[str, Any], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job configuration as a worker builds it: variable defaults, then ``values``, applied to the template."""
    from prefect.utilities.templating import apply_values

    props = tmpl["variables"]["properties"]
    variables = {k: v["default"] for k, v in props.items() if "default" in v}
    variables.update(values or {})
    jsonschema.validate(
        {k: v for k, v in variables.items() if v is not None or k in (values or {})},
        _without_required(tmpl["variables"]),
    )
    return apply_values(tmpl["job_configuration"], variables)


def worker_configuration(cls, tmpl: dict[str, Any], values: dict[str, Any]):
    """``cls.from_template_and_values`` as a worker calls it. The template has no block or variable
    references, so the client it builds is never used: point it at a closed port rather than letting
    Prefect start a temporary server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        return asyncio.run(cls.from_template_and_values(tmpl, values))


def _without_required(schema: dict[str, Any]) -> dict[str, Any]:
    from prefect.utilities.collections import remove_nested_keys

    return remove_nested_keys(["required"], schema)


# ----------------------------------------------------------------------------------- prefect.yaml


def test_prefect_yaml_is_a_valid_prefect_project_file():
    from prefect.cli.deploy._models import PrefectYamlModel

    model = PrefectYamlModel.model_validate(prefect_yaml())
    names = [d.name for d in model.deployments]
    assert len(names) == len(set(names)), names
    entrypoints = {d.entrypoint for d in model.deployments}
    for needed in (
        "flows/reconstruct.py:reconstruct_flow",
        "flows/train.py:train_flow",
        "flows/evaluate.py:evaluate_flow",
        "flows/ingest.py:ingest_flow",
    ):
        assert needed in entrypoints
    for d in model.deployments:
        assert re.fullmatch(r"flows/\w+\.py:\w+", d.entrypoint), d.entrypoint
        assert d.work_pool is not None and d.work_pool.name in POOL_TEMPLATES, (d.name, d.work_pool)


def test_schedules_are_valid_and_start_inactive():
    from prefect.cli.deploy._models import RawScheduleConfig
    from prefect.client.schemas.schedules import CronSchedule

    schedules = [s for d in DEPLOYMENTS for s in d.get("schedules") or []]
    assert schedules, "prefect.yaml should carry a schedule example"
    for s in schedules:
        RawScheduleConfig.model_validate(s)
        cron = CronSchedule(cron=s["cron"], timezone=s["timezone"])
        assert cron.cron.split()[2:] == ["2", "*", "*"]  # monthly, on the 2nd
        assert s["active"] is False


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_job_variables_fit_the_work_pool_template(deployment):
    pool = deployment["work_pool"]
    tmpl = json.loads(POOL_TEMPLATES[pool["name"]].read_text())
    jsonschema.validate(pool.get("job_variables") or {}, _without_required(tmpl["variables"]))
    render(tmpl, pool.get("job_variables") or {})


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_entrypoint_and_parameters_match_the_flow(deployment):
    path, func = deployment["entrypoint"].split(":")
    source = REPO / path
    if not source.is_file():
        pytest.skip(f"{path} is not written yet")
    tree = ast.parse(source.read_text())
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert func in defs, f"{path} defines no top-level function {func}"
    assert any("flow" in ast.unparse(d) for d in defs[func].decorator_list), f"{func} is not a Prefect @flow"
    module_name = f"climrecon.flows.{Path(path).stem}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pytest.skip(f"{module_name} does not import yet: {exc}")
    flow = getattr(module, func)
    signature = inspect.signature(flow.fn)
    params = deployment.get("parameters") or {}
    unknown = set(params) - set(signature.parameters)
    assert not unknown, (
        f"{deployment['name']}: parameters {sorted(unknown)} are not arguments of {func}{signature}"
    )
    required = {n for n, p in signature.parameters.items() if p.default is inspect.Parameter.empty}
    assert required <= set(params), (
        f"{deployment['name']}: required arguments {sorted(required - set(params))} missing"
    )
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    validate(
        params, parameter_schema(flow.fn).model_dump_for_openapi(), raise_on_error=True, ignore_required=True
    )
    for key in ("config_path",):
        value = params.get(key)
        if value:
            assert (REPO / value).is_file(), f"{deployment['name']}: {key} {value} does not exist"


def test_pull_steps_take_the_run_into_the_checkout(monkeypatch):
    """The global build step records the checkout; the process pool's pull step goes there at run time."""
    from prefect.deployments.steps.utility import run_shell_script
    from prefect.utilities.templating import apply_values

    spec = prefect_yaml()
    monkeypatch.chdir(REPO)
    # the step itself (run_steps would also emit events to a Prefect API)
    ((step, inputs),) = spec["build"][0].items()
    assert step == "prefect.deployments.steps.run_shell_script"
    inputs = dict(inputs)
    outputs = {inputs.pop("id"): asyncio.run(run_shell_script(**inputs))}
    (pull,) = apply_values(spec["pull"], outputs)
    assert pull == {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
    for d in DEPLOYMENTS:
        if d["work_pool"]["name"] == "climrecon-process":
            assert "pull" not in d and "build" not in d, d["name"]
        else:  # containers: no build on the deploying machine, the project where the image has it
            assert d["build"] == []
            assert d["pull"] == [
                {"prefect.deployments.steps.set_working_directory": {"directory": CONTAINER_PROJECT_DIR}}
            ]


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", k, v
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_no_secrets_in_deployments():
    for where, key, value in _walk(prefect_yaml()):
        assert str(key).lower() not in SECRET_OPTION_KEYS, where
        assert not re.search(r"(KEY|SECRET|TOKEN|PASSWORD)\w*\s*[=:]", json.dumps(value), flags=re.I), where


# ------------------------------------------------------------------------------- work pools


@pytest.mark.parametrize("name", ["process", "docker", "kubernetes"])
def test_base_job_templates_pass_prefects_own_validation(name):
    from prefect.server.schemas.actions import WorkPoolCreate, validate_base_job_template

    tmpl = template(name)
    validate_base_job_template(tmpl)
    jsonschema.Draft202012Validator.check_schema(tmpl["variables"])
    WorkPoolCreate(name=f"climrecon-{name}", type=name, base_job_template=tmpl)
    text = json.dumps(tmpl)
    assert not re.search(r'"(aws_secret_access_key|password|token)"\s*:\s*"[^{"]', text, flags=re.I)


def test_process_template_is_prefects_with_climrecon_defaults():
    from prefect.workers.process import ProcessJobConfiguration, ProcessWorker

    tmpl = template("process")
    default = ProcessWorker.get_default_base_job_template()
    assert tmpl["job_configuration"] == default["job_configuration"]
    assert set(tmpl["variables"]["properties"]) == set(default["variables"]["properties"])
    cfg = worker_configuration(ProcessJobConfiguration, tmpl, {"env": {"EXTRA": "1"}})
    assert cfg.env == {
        "MPLBACKEND": "Agg",
        "PYTHONUNBUFFERED": "1",
        "EXTRA": "1",
    }  # a deployment's env is merged
    assert cfg.working_dir is None and cfg.stream_output is True


# Fields of prefect-docker 0.7.4's DockerWorkerJobConfiguration (the worker passes unknown
# container_create_kwargs keys straight to docker-py's containers.create).
DOCKER_JOB_FIELDS = {
    "command",
    "env",
    "labels",
    "name",
    "image",
    "registry_credentials",
    "image_pull_policy",
    "networks",
    "network_mode",
    "auto_remove",
    "volumes",
    "stream_output",
    "mem_limit",
    "memswap_limit",
    "privileged",
    "container_create_kwargs",
}


def test_docker_template_requests_gpus_like_docker_run_gpus():
    tmpl = template("docker")
    assert set(tmpl["job_configuration"]) <= DOCKER_JOB_FIELDS
    cfg = render(tmpl)
    kwargs = cfg["container_create_kwargs"]
    assert kwargs["device_requests"] == [
        {"driver": "nvidia", "count": -1, "capabilities": [["gpu"]]}
    ]  # --gpus all
    assert kwargs["shm_size"] == "8g" and cfg["image"] == "climrecon-gpu:latest"
    two = render(tmpl, {"gpu_count": 2, "image": "registry.example.org/climrecon-gpu:1"})
    assert two["container_create_kwargs"]["device_requests"][0]["count"] == 2
    assert two["image"] == "registry.example.org/climrecon-gpu:1"
    with pytest.raises(jsonschema.ValidationError):
        render(tmpl, {"gpu_count": "all"})


def test_kubernetes_template_puts_gpus_in_limits_and_pods_on_gpu_nodes():
    tmpl = template("kubernetes")
    manifest = render(tmpl, {"gpu_count": 2, "image": "registry.example.org/climrecon-gpu:1"})["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.org/climrecon-gpu:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {})
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {m["name"] for m in container["volumeMounts"]} <= {v["name"] for v in pod["volumes"]}
    assert container["envFrom"] == [{"secretRef": {"name": "climrecon-storage", "optional": True}}]
    cpu_only = render(tmpl, {"gpu_count": 0, "node_selector": {}, "tolerations": []})["job_manifest"]
    assert cpu_only["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 0


def test_docker_template_with_the_real_prefect_docker_worker():
    pytest.importorskip("prefect_docker", reason="prefect-docker not installed (pip install prefect-docker)")
    from prefect_docker.worker import DockerWorkerJobConfiguration

    cfg = worker_configuration(DockerWorkerJobConfiguration, template("docker"), {"gpu_count": 1})
    assert cfg.container_create_kwargs["device_requests"][0]["count"] == 1


def test_kubernetes_template_with_the_real_prefect_kubernetes_worker():
    pytest.importorskip(
        "prefect_kubernetes", reason="prefect-kubernetes not installed (pip install prefect-kubernetes)"
    )
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    cfg = worker_configuration(KubernetesWorkerJobConfiguration, template("kubernetes"), {})
    assert (
        cfg.job_manifest["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == 1
    )


# ------------------------------------------------------------------------------- Dockerfiles

DOCKER_INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: comments dropped, backslash continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical = (pending + line).strip()
        pending = ""
        keyword, _, args = logical.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


@pytest.mark.parametrize(
    "flavour,base,index",
    [
        ("cpu", r"python:3\.1[1-9]-slim", "https://download.pytorch.org/whl/cpu"),
        ("gpu", r"nvidia/cuda:13\.0\.\d+-(cudnn-)?runtime-ubuntu", "https://download.pytorch.org/whl/cu130"),
    ],
)
def test_dockerfiles(flavour, base, index):
    path = DEPLOY / "docker" / f"Dockerfile.{flavour}"
    instructions = dockerfile_instructions(path)
    unknown = [k for k, _ in instructions if k not in DOCKER_INSTRUCTIONS]
    assert not unknown, f"{path}: unknown instructions {unknown}"
    assert instructions[0][0] == "FROM" and re.match(base, instructions[0][1]), instructions[0]
    runs = " ".join(a for k, a in instructions if k == "RUN")
    args = dict(a.split("=", 1) for k, a in instructions if k == "ARG" and "=" in a)
    assert args.get("TORCH_INDEX_URL") == index
    torch_installs = re.findall(r"pip install[^&]*torch[^&]*", runs)
    assert torch_installs and all(
        '"torch==2.13.0"' in t or "torch==2.13.0" in t.split() for t in torch_installs
    )
    assert all("--index-url" in t for t in torch_installs), torch_installs
    assert "bash deploy/install.sh" in runs  # the project + data exactly as on a workstation
    workdirs = [a for k, a in instructions if k == "WORKDIR"]
    assert workdirs == [CONTAINER_PROJECT_DIR]  # where prefect.yaml's container pull step goes
    for key, value in instructions:
        if key in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", value) or [value.split()[0]]
            assert not [n for n in names if re.search(r"KEY|SECRET|TOKEN|PASSWORD", n, re.I)], value
    ignore = (DEPLOY / "docker" / f"Dockerfile.{flavour}.dockerignore").read_text().split()
    assert {".git", ".venv", "outputs"} <= set(ignore)


# ------------------------------------------------------------------------------- Dask recipes


def test_shipped_dask_recipes_load(monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.1.2.3:8786")
    existing = load_recipe(DEPLOY / "dask" / "existing-scheduler.yaml")
    assert isinstance(existing, ExistingScheduler) and existing.address == "tcp://10.1.2.3:8786"
    slurm = load_recipe(DEPLOY / "dask" / "slurm-jobqueue.yaml")
    assert isinstance(slurm, SlurmCluster) and slurm.adapt and slurm.adapt.maximum >= 1
    assert "--gres=gpu:1" in slurm.cluster["job_extra_directives"]
    assert "GPU=1" in slurm.cluster["worker_extra_args"]
    k8s = load_recipe(DEPLOY / "dask" / "kubernetes-cluster.yaml")
    assert isinstance(k8s, KubernetesCluster)
    (gpu,) = k8s.worker_groups
    assert gpu.model_dump()["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "GPU=1" in gpu.model_dump()["worker_command"]


def test_existing_recipe_needs_its_variable(monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(RecipeError, match=r"existing-scheduler.yaml:\n  address: .*DASK_SCHEDULER_ADDRESS"):
        load_recipe(DEPLOY / "dask" / "existing-scheduler.yaml")


@pytest.mark.parametrize(
    "address",
    ["tcp://10.0.0.1:8786", "tls://sched.example.org:8786", "tcp://[::1]:8786", "ucx://10.0.0.1:13337"],
)
def test_scheduler_addresses_accepted(address):
    assert validate_scheduler_address(address) == address


@pytest.mark.parametrize(
    "address",
    ["10.0.0.1:8786", "http://host:8786", "tcp://host", "tcp://host:99999", "inproc://10.0.0.1/1/2"],
)
def test_scheduler_addresses_rejected(address):
    with pytest.raises(ValueError):
        validate_scheduler_address(address)


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"kind": "pbs"}, r"kind must be one of existing, slurm, kubernetes"),
        ({"kind": "slurm", "cluster": {"cores": 4}}, r"cluster is missing \['memory'\]"),
        (
            {
                "kind": "slurm",
                "cluster": {"cores": 4, "memory": "8GiB"},
                "scale": {"jobs": 2},
                "adapt": {"maximum": 3},
            },
            "either scale or adapt",
        ),
        ({"kind": "kubernetes", "cluster": {"name": "x"}}, r"cluster is missing \['image'\]"),
        (
            {"kind": "kubernetes", "cluster": {"image": "i"}, "adapt": {"minimum": 4, "maximum": 2}},
            "adapt: .*below minimum",
        ),
        ({"kind": "existing", "address": "tcp://h:1", "workers": 3}, "workers: unknown key"),
        (["kind", "existing"], "must hold a mapping"),
    ],
)
def test_invalid_recipes_are_named(raw, match):
    with pytest.raises(RecipeError, match=match) as info:
        parse_recipe(raw, "cluster.yaml")
    assert "cluster.yaml" in str(info.value)


@pytest.mark.parametrize(
    "name,package,module",
    [
        ("slurm-jobqueue", "dask-jobqueue", "dask_jobqueue"),
        ("kubernetes-cluster", "dask-kubernetes", "dask_kubernetes"),
    ],
)
def test_missing_cluster_package_is_named(name, package, module):
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(RecipeError, match=rf"needs the '{package}' package.*pip install {package}"):
        start_cluster(load_recipe(DEPLOY / "dask" / f"{name}.yaml"))


def test_existing_recipe_connects_to_a_running_scheduler():
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://", dashboard_address=":0"
    ) as cluster:
        recipe = parse_recipe({"kind": "existing", "address": cluster.scheduler_address})
        with recipe_client(recipe) as client:
            assert client.submit(sum, [1, 2, 3]).result() == 6
        assert cluster.status.name == "running"  # a scheduler reached by address is left running


# ------------------------------------------------------------------------------- flows/server.py


def test_client_environment_points_at_the_server(tmp_path):
    env = client_environment("http://127.0.0.1:4200/api", tmp_path)
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"
    assert (
        env["PREFECT_HOME"] == str(tmp_path.resolve()) and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    )


def test_wait_until_healthy_reports_a_dead_server(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("boom: the database is locked\n")
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    proc.wait()
    with pytest.raises(PrefectServerError, match=r"exited with code 3(.|\n)*database is locked"):
        wait_until_healthy(f"http://127.0.0.1:{free_port()}/api", timeout=5, process=proc, log_path=log)
    with pytest.raises(PrefectServerError, match="not healthy within"):
        wait_until_healthy(f"http://127.0.0.1:{free_port()}/api", timeout=0.5)


def test_private_servers_start_from_a_migrated_template_and_replace_a_damaged_one(tmp_path, monkeypatch):
    import sqlite3
    import urllib.request

    from climrecon.flows.server import start_server, template_database

    monkeypatch.setenv("CLIMRECON_DATA_HOME", str(tmp_path / "data"))
    template = template_database()
    assert template.parent == tmp_path / "data" / "prefect" and "template-3." in template.name
    template.parent.mkdir(parents=True)
    template.write_bytes(b"not a database" * 100)  # damaged (or from an incompatible Prefect)

    def revision(path) -> str:
        with sqlite3.connect(path) as db:
            return db.execute("select version_num from alembic_version").fetchone()[0]

    with start_server(tmp_path / "a", services=False, template=template) as first:
        assert not first.from_template  # the damaged template was dropped, the server started afresh
        head = revision(first.home / "prefect.db")
    assert revision(template) == head  # a new template, migrated to the same head
    with start_server(tmp_path / "b", services=False, template=template) as second:
        assert second.from_template
        request = urllib.request.Request(
            f"{second.api_url}/flows/filter", data=b"{}", headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200 and response.read() == b"[]"  # a working, empty database
