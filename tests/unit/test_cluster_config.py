"""cluster.yaml (Ray autoscaler, AWS) and k8s/raycluster.yaml (KubeRay), checked offline: no network, no cloud,
no Ray started (Ray's packages are imported, nothing more).

cluster.yaml goes through Ray's own code: ``prepare_config`` merges in the AWS defaults exactly as ``ray up``
does, ``validate_config`` checks the result against ``ray/autoscaler/ray-schema.json`` (shipped in the installed
ray package) plus Ray's cross-field rules; the raw file is also checked against that schema with jsonschema. The
``ray start`` and ``ray drain-node`` command lines are parsed by Ray's own click commands, and every shell
command by ``bash -n``. Structural assertions then pin what this project needs: an on-demand head without GPUs,
spot worker types (``InstanceMarketOptions.MarketType: spot``), an on-demand GPU fallback, sane min/max workers,
an idle timeout, installs by the lock (``constraints.txt``; CPU torch on CPU nodes, CUDA torch on GPU nodes),
and token authentication on for every node.

k8s/raycluster.yaml: no KubeRay CRD JSON schema ships in any installed package (there is no kuberay or
kubernetes package in this environment) and nothing is downloaded, so the manifest is *not* validated against the
CRD. It gets structural checks, plus Ray's own KubeRay translation (``_derive_autoscaling_config_from_ray_cr``,
the code the in-tree autoscaler runs on the RayCluster resource; it ends in ``validate_config``). The Dockerfile
that installs the project into the image gets the same lock checks as the VM setup commands.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

CLUSTER_YAML = REPO / "cluster.yaml"
KUBERAY_YAML = REPO / "k8s" / "raycluster.yaml"
DOCKERFILE = REPO / "k8s" / "Dockerfile"
AUTH_DISABLED = re.compile(r"RAY_AUTH_MODE\W{0,4}disabled", re.IGNORECASE)


def _pin(package: str) -> str:
    """The version constraints.txt pins for PACKAGE."""
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise AssertionError(f"{package} is not pinned in constraints.txt")


def _is_gpu_instance(instance_type: str) -> bool:
    family = instance_type.split(".")[0]
    return re.match(r"(p|g|dl|inf|trn)\d", family) is not None


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    """The config as `ray up` sees it after merging the provider's defaults (no cloud call)."""
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw))


def _types(cfg: dict) -> dict:
    return cfg["available_node_types"]


def _workers(cfg: dict) -> dict:
    return {name: t for name, t in _types(cfg).items() if name != cfg["head_node_type"]}


def _is_spot(node_type: dict) -> bool:
    return node_type["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "").lower() == "spot"


def _gpus(node_type: dict) -> int:
    return int(node_type.get("resources", {}).get("GPU", 0))


def _setup_commands(cfg: dict, name: str) -> list[str]:
    """The setup commands the autoscaler runs on a node of type NAME (same rule as Ray's updater)."""
    if name == cfg["head_node_type"]:
        return cfg["head_setup_commands"]  # prepare_config prepended setup_commands
    return _types(cfg)[name].get("worker_setup_commands", cfg["worker_setup_commands"])


def _ray_start_args(command: str) -> list[str]:
    """The arguments after `ray start` in a start command (shell variables given sample values)."""
    tail = command[command.index("ray start") + len("ray start"):]
    return shlex.split(tail.replace("$RAY_HEAD_IP", "10.0.0.1"))


def _exports(command: str) -> dict[str, str]:
    """KEY=VALUE pairs from `export ...;` / inline assignments in a shell command line."""
    return dict(re.findall(r"(?:^|[\s;])([A-Z_][A-Z0-9_]*)=([^\s;]+)", command))


# ---- cluster.yaml: Ray's own schema and validator ----------------------------------------------------------------


def test_cluster_yaml_passes_rays_schema_and_validator(raw, prepared):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written
    validate_config(prepared)  # what `ray up` validates: schema + head type + sum(min_workers) <= max_workers
    assert prepared["provider"]["type"] == "aws"


def test_validator_would_catch_a_broken_config(prepared):
    """The schema check is live: an unknown key in a node type, or min_workers above the cap, is refused."""
    import jsonschema
    from ray.autoscaler._private.util import validate_config

    bad = copy.deepcopy(prepared)
    next(iter(_workers(bad).values()))["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(bad)
    bad = copy.deepcopy(prepared)
    next(iter(_workers(bad).values()))["min_workers"] = bad["max_workers"] + 1
    with pytest.raises(ValueError):
        validate_config(bad)


def test_node_labels_are_valid_ray_labels(raw):
    from ray._private.label_utils import validate_node_label_syntax

    for node_type in _types(raw).values():
        validate_node_label_syntax(node_type.get("labels", {}))


# ---- cluster.yaml: structure ----------------------------------------------------------------------------------------


def test_head_is_on_demand_and_has_no_gpu(prepared):
    head = _types(prepared)[prepared["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    assert not _is_gpu_instance(head["node_config"]["InstanceType"])
    assert "InstanceMarketOptions" not in head["node_config"], "the head must be on-demand"
    assert head["max_workers"] == 0
    from ray.scripts.scripts import start

    starts = [c for c in prepared["head_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 1
    params = start.make_context("start", _ray_start_args(starts[0])).params
    assert params["head"] and params["num_gpus"] == 0


def test_spot_worker_types_for_cpu_and_gpu(prepared):
    spot = {name: t for name, t in _workers(prepared).items() if _is_spot(t)}
    assert any(_gpus(t) == 0 for t in spot.values()), "no CPU spot worker type"
    assert any(_gpus(t) >= 1 for t in spot.values()), "no GPU spot worker type"
    for name, t in spot.items():
        assert t["resources"].get("spot") == 1, f"{name}: spot types advertise the custom resource spot: 1"
        assert t.get("labels", {}).get("market") == "spot", name
        spot_options = t["node_config"]["InstanceMarketOptions"].get("SpotOptions", {})
        assert spot_options.get("SpotInstanceType", "one-time") == "one-time", name  # Ray terminates, never stops
        assert _gpus(t) == 0 or _is_gpu_instance(t["node_config"]["InstanceType"]), name
    assert prepared["provider"]["cache_stopped_nodes"] is False, "spot instances cannot be stopped"


def test_on_demand_gpu_fallback_ranks_below_spot(prepared):
    workers = _workers(prepared)
    spot_gpu = [t for t in workers.values() if _is_spot(t) and _gpus(t) >= 1]
    fallback = [t for t in workers.values() if not _is_spot(t) and _gpus(t) >= 1]
    assert fallback, "no on-demand GPU type to fall back to"
    for t in fallback:
        assert "spot" not in t["resources"]
        assert _is_gpu_instance(t["node_config"]["InstanceType"])
        # Same shape as a spot GPU type (same instance type and resource names) so priority decides between them.
        twins = [s for s in spot_gpu if s["node_config"]["InstanceType"] == t["node_config"]["InstanceType"]]
        assert twins, "the fallback should offer the spot GPU type's machine"
        for s in twins:
            assert t.get("priority", 0) < s.get("priority", 0)
            assert set(t["resources"]) - {"on_demand"} == set(s["resources"]) - {"spot"}


def test_min_max_workers_and_idle_timeout(raw, prepared):
    cap = prepared["max_workers"]
    for name, t in _workers(raw).items():
        assert "min_workers" in t and "max_workers" in t, f"{name}: set min/max explicitly"
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cap, name
    assert sum(t["min_workers"] for t in _workers(raw).values()) <= cap
    assert raw["idle_timeout_minutes"] > 0


def test_every_node_installs_the_project_with_the_lock(prepared):
    torch_pin = f"torch=={_pin('torch')}"
    for name, t in _types(prepared).items():
        commands = _setup_commands(prepared, name)
        torch_at = [i for i, c in enumerate(commands) if torch_pin in c and "pip install" in c]
        project_at = [i for i, c in enumerate(commands) if re.search(r"pip install .*-e \.(\s|$)", c)]
        assert len(torch_at) == 1 and len(project_at) == 1, f"{name}: {commands}"
        torch_cmd, project_cmd = commands[torch_at[0]], commands[project_at[0]]
        assert torch_at[0] < project_at[0], f"{name}: torch must be installed before the project"
        for cmd in (torch_cmd, project_cmd):
            assert re.search(r"-c \S*constraints\.txt", cmd), f"{name}: not installed with constraints.txt: {cmd}"
        assert "DS_BUILD_OPS=0" in project_cmd
        cpu_index = "download.pytorch.org/whl/cpu" in torch_cmd
        if _gpus(t) >= 1:
            assert not cpu_index, f"{name}: a GPU node needs the CUDA build of torch"
            assert any("torch.version.cuda" in c for c in commands[torch_at[0]:project_at[0]]), (
                f"{name}: no check that the torch it installed has CUDA")
        else:
            assert cpu_index, f"{name}: CPU nodes take the CPU wheel"


def test_the_checkout_and_the_token_reach_every_node(prepared):
    mounts = prepared["file_mounts"]
    home = f"/home/{prepared['auth']['ssh_user']}"
    assert mounts.get(f"{home}/scalestack") == ".", "the repository is mounted at ~/scalestack"
    assert mounts.get(f"{home}/.ray/auth_token") == "~/.ray/auth_token", "Ray's documented token file mount"
    for name in _types(prepared):
        assert any("cd ~/scalestack" in c for c in _setup_commands(prepared, name)), name
    assert ".gitignore" in prepared["rsync_filter"] and ".venv" in prepared["rsync_exclude"]


def test_token_auth_is_on_for_every_ray_start(prepared):
    from ray.scripts.scripts import start

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in prepared[key] if "ray start" in c]
        assert starts, key
        for command in starts:
            assert _exports(command).get("RAY_AUTH_MODE") == "token", command
            start.make_context("start", _ray_start_args(command))  # flags Ray's CLI accepts
    head = start.make_context("start", _ray_start_args(
        next(c for c in prepared["head_start_ray_commands"] if "ray start" in c))).params
    assert head["dashboard_port"] == 8265 and head["dashboard_host"] == "0.0.0.0"
    assert head["autoscaling_config"], "the head runs the autoscaler"
    worker = start.make_context("start", _ray_start_args(
        next(c for c in prepared["worker_start_ray_commands"] if "ray start" in c))).params
    assert worker["address"] == "10.0.0.1:6379"


def test_every_ray_start_runs_serves_proxy_over_grpc(prepared, cr):
    """A proxy runs on every node and reads PROXY_ENV when it starts: every node's Ray gets it, as `app serve` does."""
    from serve_deployments.app import PROXY_ENV

    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        for command in (c for c in prepared[key] if "ray start" in c):
            assert PROXY_ENV.items() <= _exports(command).items(), command
    spec = cr["spec"]
    containers = [("head", c) for c in _containers(spec["headGroupSpec"])]
    containers += [(g["groupName"], c) for g in spec["workerGroupSpecs"] for c in _containers(g)]
    for where, container in containers:
        assert {k: _env(container).get(k, {}).get("value") for k in PROXY_ENV} == PROXY_ENV, where


def test_the_head_declares_a_lost_node_dead_quickly(prepared, cr):
    """The GCS runs on the head: both cluster definitions give it the node health checks the chaos harness's
    local cluster uses (a node lost without notice off Ray's books in ~3 s)."""
    from pipelines.elastic import NODE_HEALTH_CHECK

    want = {k: str(v) for k, v in NODE_HEALTH_CHECK.items()}
    start = next(c for c in prepared["head_start_ray_commands"] if "ray start" in c)
    assert dict(re.findall(r"RAY_(health_check_\w+)=(\d+)", start)) == want
    head_env = _env(_containers(cr["spec"]["headGroupSpec"])[0])
    assert {k: head_env[f"RAY_{k}"]["value"] for k in NODE_HEALTH_CHECK} == want
    assert NODE_HEALTH_CHECK["health_check_period_ms"] * NODE_HEALTH_CHECK["health_check_failure_threshold"] <= 5000


def test_token_auth_is_not_disabled_anywhere():
    for path in (CLUSTER_YAML, KUBERAY_YAML, DOCKERFILE):
        text = path.read_text()
        assert not AUTH_DISABLED.search(text), f"{path.name} disables token authentication"
        assert "RAY_AUTH_TOKEN=" not in text, f"{path.name} holds a literal token"


def test_spot_types_drain_on_the_interruption_notice(prepared):
    """Spot nodes run a watcher that turns EC2's notice into `ray drain-node --reason ..._PREEMPTION`."""
    from ray.core.generated import autoscaler_pb2
    from ray.scripts.scripts import drain_node

    for name, t in _workers(prepared).items():
        watchers = [c for c in _setup_commands(prepared, name) if "ray drain-node" in c]
        if not _is_spot(t):
            assert not watchers, f"{name} is on-demand"
            continue
        assert len(watchers) == 1, name
        assert "169.254.169.254/latest/meta-data/spot/instance-action" in watchers[0]
        assert "X-aws-ec2-metadata-token" in watchers[0], "IMDSv2"
        args = re.search(r"ray drain-node (.*?) && exit 0", watchers[0]).group(1)
        params = drain_node.make_context("drain-node", shlex.split(args.replace("$RAY_HEAD_IP", "10.0.0.1"))).params
        assert autoscaler_pb2.DrainNodeReason.Value(params["reason"]) == autoscaler_pb2.DRAIN_NODE_REASON_PREEMPTION
        assert 0 < params["deadline_remaining_seconds"] < 120, "EC2 gives two minutes"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_shell_command_parses(raw, prepared):
    commands = list(prepared["initialization_commands"]) + prepared["head_setup_commands"]
    commands += prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"]
    for t in _types(raw).values():
        commands += t.get("worker_setup_commands", []) + t.get("initialization_commands", [])
    inner = [m for c in commands for m in re.findall(r"bash -c '([^']*)'", c)]
    for command in commands + inner:
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command}\n{result.stderr}"


# ---- k8s/raycluster.yaml ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cr() -> dict:
    docs = [d for d in yaml.safe_load_all(KUBERAY_YAML.read_text()) if d]
    clusters = [d for d in docs if d.get("kind") == "RayCluster"]
    assert len(clusters) == 1
    return clusters[0]


def _containers(spec: dict) -> list[dict]:
    return spec["template"]["spec"]["containers"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _capacity_types(pod_spec: dict) -> set[str]:
    """Karpenter capacity types a pod may land on (nodeSelector or required node affinity)."""
    selector = pod_spec.get("nodeSelector", {}).get("karpenter.sh/capacity-type")
    if selector:
        return {selector}
    terms = (pod_spec.get("affinity", {}).get("nodeAffinity", {})
             .get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", []))
    return {v for term in terms for e in term.get("matchExpressions", [])
            if e["key"] == "karpenter.sh/capacity-type" and e["operator"] == "In" for v in e["values"]}


def test_kuberay_resource_shape(cr):
    assert cr["apiVersion"] == "ray.io/v1" and cr["kind"] == "RayCluster"
    spec = cr["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == _pin("ray")
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    assert spec["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative")
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"], group["groupName"]
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]


def test_kuberay_translation_by_rays_autoscaler(cr):
    """What the in-tree autoscaler derives from this resource, validated by Ray's schema on the way."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    resource = copy.deepcopy(cr)
    resource["metadata"].setdefault("namespace", "default")  # the API server always fills it in
    config = _derive_autoscaling_config_from_ray_cr(resource)
    types = config["available_node_types"]
    assert types["headgroup"]["resources"].get("GPU", 0) == 0
    assert config["idle_timeout_minutes"] == cr["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] / 60
    groups = {g["groupName"]: g for g in cr["spec"]["workerGroupSpecs"]}
    for name, group in groups.items():
        pod = group["template"]["spec"]
        if _capacity_types(pod) == {"spot"}:
            assert types[name]["resources"].get("spot") == 1, f"{name}: spot-only group advertises spot: 1"
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())


def test_kuberay_spot_cpu_group(cr):
    spot = [g for g in cr["spec"]["workerGroupSpecs"]
            if g["template"]["spec"].get("nodeSelector", {}).get("karpenter.sh/capacity-type") == "spot"]
    assert spot, "no worker group pinned to spot capacity (karpenter.sh/capacity-type: spot)"
    for group in spot:
        pod = group["template"]["spec"]
        assert any(t.get("key") == "scalestack.io/spot" for t in pod.get("tolerations", [])), group["groupName"]
        limits = _containers(group)[0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in limits, "the spot-only group is the CPU group"


def test_kuberay_gpu_group(cr):
    gpu = [g for g in cr["spec"]["workerGroupSpecs"]
           if int(_containers(g)[0]["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) >= 1]
    assert gpu, "no worker group requests nvidia.com/gpu"
    for group in gpu:
        container = _containers(group)[0]
        assert container["resources"]["requests"].get("nvidia.com/gpu") == container["resources"]["limits"][
            "nvidia.com/gpu"], "extended resources: requests must equal limits"
        assert container["image"].endswith("-gpu"), "GPU pods use the CUDA image"
        assert "spot" in _capacity_types(group["template"]["spec"]), "GPU pods may use spot capacity"
        assert any(t.get("key") == "nvidia.com/gpu" for t in group["template"]["spec"].get("tolerations", []))


def test_kuberay_head_has_no_gpu_and_is_on_demand(cr):
    head = cr["spec"]["headGroupSpec"]
    for container in _containers(head):
        for section in ("requests", "limits"):
            assert not any(k.endswith("/gpu") for k in container.get("resources", {}).get(section, {}))
        assert container["image"].endswith("-cpu")
    assert head["rayStartParams"].get("num-gpus") == "0"
    assert _capacity_types(head["template"]["spec"]) == {"on-demand"}


def test_kuberay_token_reaches_every_container(cr):
    spec = cr["spec"]
    envs = [("autoscaler", {e["name"]: e for e in spec["autoscalerOptions"]["env"]})]
    envs += [("head", _env(c)) for c in _containers(spec["headGroupSpec"])]
    envs += [(g["groupName"], _env(c)) for g in spec["workerGroupSpecs"] for c in _containers(g)]
    secrets = set()
    for where, env in envs:
        assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
        ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
        secrets.add((ref["name"], ref["key"]))
    assert len(secrets) == 1, f"every container must read the same token: {secrets}"


def test_kuberay_workers_outlive_the_drain(cr):
    """Pods get SIGTERM on a reclaim; Ray drains for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, within the grace period."""
    for group in cr["spec"]["workerGroupSpecs"]:
        grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
        drain = float(_env(_containers(group)[0])["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]["value"])
        assert 0 < drain < grace <= 120, group["groupName"]  # EC2's notice is two minutes


def test_kuberay_images_install_the_project_with_the_lock(cr):
    text = DOCKERFILE.read_text()
    assert re.search(rf"^FROM rayproject/ray:{re.escape(_pin('ray'))}-py311-\$\{{VARIANT\}}$", text, re.M)
    runs = [block for block in re.split(r"\n(?=[A-Z]+ )", text) if block.startswith("RUN ")]
    torch_pin = f"torch=={_pin('torch')}"
    torch_run = next(i for i, r in enumerate(runs) if torch_pin in r)
    project_run = next(i for i, r in enumerate(runs) if re.search(r"pip install .*-e \.", r))
    assert torch_run < project_run
    assert runs[torch_run].count(f"-c constraints.txt {torch_pin}") == 2, "both variants use the lock"
    assert "download.pytorch.org/whl/cpu" in runs[torch_run] and "torch.version.cuda" in runs[torch_run]
    assert "-c constraints.txt -e ." in runs[project_run]
    assert re.search(r"^ENV DS_BUILD_OPS=0", text, re.M)
    images = [c["image"] for c in _containers(cr["spec"]["headGroupSpec"])]
    images += [c["image"] for g in cr["spec"]["workerGroupSpecs"] for c in _containers(g)]
    assert all(re.fullmatch(r"\S+/scalestack:[\w.]+-(cpu|gpu)", image) for image in images), images
