"""Joining or starting Ray for one command: loopback only, no dashboard, no log spam, bounded
memory; an unreachable address is refused before any work."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

# Ray's object store on a machine it starts for us: enough for the texts in flight, no more.
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


class ClusterError(Exception):
    """Ray is missing, or the cluster cannot be reached or cannot give what was asked."""


def import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install 'allinone[scale]'") from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """A TCP connect to the head's GCS port first: ray.init itself retries for a long time."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r}: expected HOST:PORT (the head's GCS port, default 6379)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ClusterError(f"Ray address {address}: cannot connect ({err.strerror or err})") from None


@contextlib.contextmanager
def ray_session(address: str | None, cpus_needed: float):
    """Ray for the length of a command: joins `address` (HOST:PORT) or starts a local Ray on
    loopback with this machine's CPUs, and stops what it started (a joined cluster stays up)."""
    ray = import_ray()
    if address:
        check_reachable(address)
    elif cpus_needed > (os.cpu_count() or 1):
        raise ClusterError(
            f"this machine has {os.cpu_count()} CPUs; {cpus_needed:g} were asked for (actors × threads per actor)"
        )
    # Ray's own progress bars and per-operator logs: the command draws one bar of its own.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The driver's core worker logs to stderr; Ray Data's actor pools trip one of its warnings on
    # every run (constructor arguments in the object store, ray-project/ray#53727). Failures
    # still reach us as Python exceptions.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    if address:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError) as err:
            hint = ""
            causes, cause = [], err
            while cause is not None:
                causes.append(str(cause))
                cause = cause.__cause__ or cause.__context__
            if "authentication" in " ".join(causes).lower():
                hint = (
                    " (the cluster uses token authentication, the default of `ray start`: set RAY_AUTH_MODE=token "
                    "and give the cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN)"
                )
            raise ClusterError(f"Ray address {address}: cannot join the cluster{hint}") from None
    else:
        ray.init(
            num_cpus=os.cpu_count() or 1,
            object_store_memory=LOCAL_OBJECT_STORE_BYTES,
            _node_ip_address="127.0.0.1",
            **options,
        )
    try:
        available = ray.cluster_resources().get("CPU", 0)
        if cpus_needed > available:
            raise ClusterError(
                f"the Ray cluster has {available:g} CPUs; {cpus_needed:g} were asked for (actors × threads per actor)"
            )
        from ray.data import DataContext

        context = DataContext.get_current()
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        yield ray
    finally:
        ray.shutdown()
