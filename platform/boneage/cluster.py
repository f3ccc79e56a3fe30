"""The demo's own local Ray cluster, and the runtime env that runs this project's jobs on any cluster.

    python -m boneage.cluster start                # start the project's local cluster, or find the running one
    python -m boneage.cluster submit -- python jobs/train.py --config configs/demo.yaml
    python -m boneage.cluster serve-deploy configs/serve.yaml
    python -m boneage.cluster service-url          # where the service answers
    python -m boneage.cluster stop                 # stops this cluster only (never `ray stop`: that ends them all)

The cluster has its own temp dir (keyed by the project folder) and its own ports, so it runs beside a user's
cluster; what the next run needs to find it again is kept in ``outputs/ray-cluster.json``. ``submit`` sends a job
to it (or to ``--address``) with :func:`job_runtime_env`: this interpreter, the library and the working dir, so the
job runs in this project's environment whoever started the head.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

import boneage
from boneage.errors import JobError

log = logging.getLogger(__name__)

STATE_FILE = Path("outputs/ray-cluster.json")
# Ray starts a raylet's workers on ports 10002-19999 by default: the head's own ports must stay outside them.
WORKER_PORTS = range(10002, 20000)


class ClusterError(JobError):
    """The project's cluster cannot be started, found or used as asked."""


@dataclass(frozen=True)
class HeadPorts:
    """Every port a second Ray head on the same machine must not share with another."""

    gcs: int
    dashboard: int
    client_server: int
    dashboard_agent_listen: int
    dashboard_agent_grpc: int
    metrics_export: int
    runtime_env_agent: int
    node_manager: int
    object_manager: int

    def start_flags(self) -> list[str]:
        """The ``ray start`` flags that pin these ports."""
        return [f"--port={self.gcs}", f"--dashboard-port={self.dashboard}",
                f"--ray-client-server-port={self.client_server}",
                f"--dashboard-agent-listen-port={self.dashboard_agent_listen}",
                f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc}",
                f"--metrics-export-port={self.metrics_export}", f"--runtime-env-agent-port={self.runtime_env_agent}",
                f"--node-manager-port={self.node_manager}", f"--object-manager-port={self.object_manager}"]


@dataclass(frozen=True)
class LocalCluster:
    """The project's local cluster: where it keeps its files, its ports, and the Serve HTTP port once deployed."""

    temp_dir: Path
    ports: HeadPorts
    serve_port: int | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.dashboard}"

    def save(self, state_file: Path) -> None:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        record = {"temp_dir": str(self.temp_dir), "ports": dataclasses.asdict(self.ports),
                  "serve_port": self.serve_port}
        tmp = state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(state_file)

    @classmethod
    def load(cls, state_file: Path) -> LocalCluster | None:
        """The cluster recorded in ``state_file``, or None when there is no readable record."""
        try:
            record = json.loads(state_file.read_text())
            return cls(Path(record["temp_dir"]), HeadPorts(**record["ports"]), record.get("serve_port"))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def default_temp_dir(root: Path) -> Path:
    """A short temp dir keyed by the project folder: Ray's socket paths under it must stay under 108 characters."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"boneage-ray-{key}"


def free_port(avoid: Sequence[int] = ()) -> int:
    """A TCP port nothing listens on now, outside Ray's worker port range and ``avoid``."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in WORKER_PORTS and port not in avoid:
            return port


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pick_ports() -> HeadPorts:
    """Nine distinct free ports."""
    chosen: list[int] = []
    for _ in dataclasses.fields(HeadPorts):
        chosen.append(free_port(avoid=chosen))
    return HeadPorts(*chosen)


def head_processes(temp_dir: Path, gcs_port: int) -> list[int]:
    """Pids of one Ray cluster's processes on this machine: those naming its temp dir or holding files in it (its
    agents and workers retitle themselves, e.g. ``ray::DashboardAgent``, but keep their logs open there), and its
    Ray client server, whose command line names only the GCS address (``--address=<ip>:<gcs port>``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            ours = (any(str(temp_dir) in arg for arg in args) or _is_client_server_of(args, gcs_port)
                    or _holds_files_in(entry, temp_dir))
        except OSError:
            continue  # exited meanwhile
        if ours:
            found.append(int(entry.name))
    return found


def _holds_files_in(process: Path, folder: Path) -> bool:
    prefix = f"{folder}{os.sep}"
    for fd in (process / "fd").iterdir():
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            continue  # closed meanwhile
    return False


def _is_client_server_of(args: list[str], gcs_port: int) -> bool:
    return "ray.util.client.server" in args and any(
        arg.startswith("--address=") and arg.endswith(f":{gcs_port}") for arg in args)


def stop_head(temp_dir: Path, gcs_port: int) -> None:
    """Stop one Ray cluster's processes (see :func:`head_processes`): `ray stop` would end every cluster on the
    machine, a user's included."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in head_processes(temp_dir, gcs_port):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 10
        while head_processes(temp_dir, gcs_port) and time.monotonic() < deadline:
            time.sleep(0.5)


def is_running(cluster: LocalCluster) -> bool:
    """Whether the recorded cluster still runs: its processes exist and its dashboard answers on its port."""
    ports = cluster.ports
    return bool(head_processes(cluster.temp_dir, ports.gcs)) and port_in_use(ports.dashboard) and port_in_use(ports.gcs)


def _ray_cli(name: str = "ray") -> str:
    """Ray's ``name`` command (`ray`, `serve`) of this interpreter's environment, not the first one on PATH."""
    return str(Path(sys.executable).parent / name)


def _ray_env() -> dict[str, str]:
    """The environment for Ray's CLI: this interpreter's bin first on PATH (the head's processes and its jobs
    inherit it), token authentication (Ray 2.60's default for `ray start --head`), no RAY_ADDRESS pointing
    elsewhere."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.setdefault("RAY_AUTH_MODE", "token")
    env.pop("RAY_ADDRESS", None)
    return env


def start_cluster(state_file: Path = STATE_FILE, temp_dir: Path | None = None, num_cpus: int | None = None
                  ) -> LocalCluster:
    """Find the project's cluster recorded in ``state_file`` if it still runs, else start a new one on free ports
    (its head runs from the current folder, where Serve imports ``serve.app``) and record it."""
    known = LocalCluster.load(state_file)
    if known is not None and is_running(known):
        return known
    cluster = LocalCluster(temp_dir or default_temp_dir(Path.cwd()), pick_ports())
    if known is not None:
        stop_head(known.temp_dir, known.ports.gcs)  # what is left of it would hold its temp dir and ports
    cpus = [f"--num-cpus={num_cpus}"] if num_cpus else []
    # Its processes inherit RAY_ADDRESS: Ray's helpers that find "the" cluster by auto-discovery (Ray Train's
    # placement group cleaner) would otherwise give up, or pick another, when several run on the machine.
    env = {**_ray_env(), "RAY_ADDRESS": f"127.0.0.1:{cluster.ports.gcs}"}
    started = subprocess.run(
        [_ray_cli(), "start", "--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         "--disable-usage-stats", f"--temp-dir={cluster.temp_dir}", *cluster.ports.start_flags(), *cpus],
        env=env, capture_output=True, text=True)
    if started.returncode != 0:
        stop_head(cluster.temp_dir, cluster.ports.gcs)
        last_line = (started.stderr.strip().splitlines() or ["no output"])[-1]
        raise ClusterError(f"`ray start` failed ({last_line}); Ray's logs are in {cluster.temp_dir}")
    cluster.save(state_file)
    return cluster


def require_cluster(state_file: Path) -> LocalCluster:
    cluster = LocalCluster.load(state_file)
    if cluster is None or not is_running(cluster):
        raise ClusterError("the project's Ray cluster is not running: start it with "
                           "`python -m boneage.cluster start` (or `make demo`)")
    return cluster


def job_runtime_env(python: str | None = None) -> dict:
    """The runtime env that runs a job in this project's environment whoever started the head.

    ``py_executable`` names the interpreter of the job's workers and its supervisor; the entrypoint (``python
    jobs/...``) is a shell command, so ``env_vars`` puts that interpreter's folder first on PATH (Ray expands
    ``${PATH}`` on the node). ``py_modules`` ships this library, ``working_dir`` the project (git-ignored files such
    as outputs/ stay behind). ``python`` names another interpreter on the nodes, e.g. ``python`` for the image's own
    on a cluster.yaml cluster, where the project is installed on every node."""
    library = Path(boneage.__file__).resolve().parent
    env: dict = {"working_dir": ".", "py_modules": [str(library)]}
    python = python or sys.executable
    env["py_executable"] = python
    if os.sep in python:
        env["env_vars"] = {"PATH": f"{Path(python).parent}{os.pathsep}${{PATH}}"}
    return env


def check_job_environment(address: str, python: str | None) -> None:
    """Refuse, before any work, a job that could not run: the named interpreter lacks torch or Ray, or the
    cluster runs another Ray version than this interpreter (Ray's processes of two versions cannot talk)."""
    needed = ["ray"] if python else ["ray", "torch"]  # another interpreter on the nodes is checked by Ray there
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise ClusterError(f"{sys.executable} lacks {missing[0]}: run this with the project's .venv/bin/python")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # before Ray reads it: the client sends ~/.ray/auth_token
    os.environ.pop("RAY_ADDRESS", None)  # ``address`` is the cluster; Ray's client would also try this one's GCS
    import ray
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, AuthenticationError) as err:
        raise ClusterError(f"no Ray cluster answers at {address} ({str(err).splitlines()[0]}): start one with "
                           "`python -m boneage.cluster start`") from None
    theirs = client._server_ray_version  # read by the constructor's version check; no public accessor
    if theirs != ray.__version__:
        raise ClusterError(f"the cluster at {address} runs Ray {theirs} but this project's environment has Ray "
                           f"{ray.__version__}: start the project's own cluster with `python -m boneage.cluster "
                           "start` (it runs beside the other one)")


def submit_job(address: str, entrypoint: Sequence[str], python: str | None = None) -> int:
    """Submit ``entrypoint`` with :func:`job_runtime_env` through `ray job submit`, following its log; returns
    the job's exit status as `ray job submit` reports it."""
    check_job_environment(address, python)
    command = [_ray_cli(), "job", "submit", "--address", address,
               "--runtime-env-json", json.dumps(job_runtime_env(python)), "--", *entrypoint]
    return subprocess.run(command, env=_ray_env()).returncode


def choose_serve_port(cluster: LocalCluster, wanted: int) -> int:
    """Serve's HTTP port: the one this cluster already serves on, else ``wanted`` if free, else a free one."""
    if cluster.serve_port is not None:
        return cluster.serve_port
    return free_port() if port_in_use(wanted) else wanted


def serve_deploy(cluster: LocalCluster, config: Path, state_file: Path) -> str:
    """`serve deploy` ``config`` to the cluster on a port nobody else holds (the config as deployed is written
    beside ``state_file``); returns the service URL."""
    out = state_file.with_name("serve-deployed.yaml")
    spec = yaml.safe_load(config.read_text())
    http = spec.setdefault("http_options", {})
    port = choose_serve_port(cluster, int(http.get("port", 8000)))
    http["port"] = port
    out.write_text(f"# {config} as deployed to the project's cluster (port {port})\n" + yaml.safe_dump(spec))
    deployed = subprocess.run([_ray_cli("serve"), "deploy", str(out), "--address",
                               cluster.dashboard_url], env=_ray_env())
    if deployed.returncode != 0:
        raise ClusterError(f"`serve deploy {out}` failed (see above)")
    dataclasses.replace(cluster, serve_port=port).save(state_file)
    return f"http://{http.get('host', '127.0.0.1')}:{port}"


def service_url(cluster: LocalCluster, config: Path = Path("configs/serve.yaml")) -> str:
    """Where the deployed service answers (before the first deployment: where it will)."""
    http = yaml.safe_load(config.read_text()).get("http_options", {})
    port = choose_serve_port(cluster, int(http.get("port", 8000)))
    return f"http://{http.get('host', '127.0.0.1')}:{port}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m boneage.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, default=STATE_FILE, help=f"the cluster's record (default: {STATE_FILE})")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start the project's cluster, or find it running")
    start.add_argument("--temp-dir", type=Path, help="Ray's temp dir (default: /tmp/boneage-ray-<hash of this folder>)")
    start.add_argument("--num-cpus", type=int, help="logical CPUs (default: the machine's)")
    commands.add_parser("stop", help="stop the project's cluster (only it)")
    commands.add_parser("address", help="print the cluster's dashboard URL (the address for jobs and Serve)")
    commands.add_parser("service-url", help="print the service's URL")
    for name in ("runtime-env", "submit"):
        sub = commands.add_parser(name, help="print the jobs' runtime env as JSON" if name == "runtime-env" else
                                  "submit a job with that runtime env: submit [--address URL] -- python jobs/...")
        sub.add_argument("--python", help="the interpreter on the nodes (default: this one); `python` where the "
                         "project is installed on every node (cluster.yaml)")
    commands.choices["submit"].add_argument("--address", help="a dashboard URL (default: the project's cluster)")
    commands.choices["submit"].add_argument("entrypoint", nargs="+", help="the job's command")
    deploy = commands.add_parser("serve-deploy", help="serve deploy a Serve config on a port nobody else holds")
    deploy.add_argument("config", type=Path)
    args = parser.parse_args(argv)
    try:
        _run(args)
    except JobError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


def _run(args: argparse.Namespace) -> None:
    if args.command == "start":
        cluster = start_cluster(args.state, args.temp_dir, args.num_cpus)
        print(f"Ray cluster: {cluster.dashboard_url} (temp dir {cluster.temp_dir}; stop it with "
              "`python -m boneage.cluster stop`)")
    elif args.command == "stop":
        cluster = LocalCluster.load(args.state)
        if cluster is not None:
            stop_head(cluster.temp_dir, cluster.ports.gcs)
            args.state.unlink()
    elif args.command == "runtime-env":
        print(json.dumps(job_runtime_env(args.python)))
    elif args.command == "submit":
        address = args.address or require_cluster(args.state).dashboard_url
        sys.exit(submit_job(address, args.entrypoint, args.python))
    elif args.command == "serve-deploy":
        print(f"service: {serve_deploy(require_cluster(args.state), args.config, args.state)}")
    else:
        cluster = require_cluster(args.state)
        print(cluster.dashboard_url if args.command == "address" else service_url(cluster))


def wants_gpu(use_gpu: str | bool, key: str) -> bool:
    """A ``use_gpu`` setting (``key`` names it in messages): true/false as given, or for "auto" whether the cluster
    this process is connected to has a GPU. Only asks: the caller connects first (:func:`connect_to_ray`)."""
    if use_gpu == "auto":
        import ray

        if not ray.is_initialized():
            raise RuntimeError(f"{key}=auto asks the Ray cluster whether it has a GPU: connect first")
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(use_gpu)


def connect_to_ray() -> None:
    """Join the Ray cluster (``RAY_ADDRESS``, the one this job was submitted to, or a new local one) unless this
    process already has. Here, not in boneage.train: a job that only scores need not import Ray Train (4 s)."""
    import ray

    if not ray.is_initialized():
        log.info("connecting to the Ray cluster ...")
        ray.init()


if __name__ == "__main__":
    main()
