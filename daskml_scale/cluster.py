"""Connect to a Dask cluster: local CPU workers, local GPU workers, or a remote scheduler.

The same user code runs on a laptop and on a cluster; only the address given to
:func:`connect` changes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import dask
import dask.config
from distributed import Client, LocalCluster, WorkerPlugin
from distributed.security import Security

from daskml_scale import backend, config
from daskml_scale.exceptions import ArgumentError, ClusterError, GPUUnavailableError

__all__ = ["connect", "KerasWorkerPlugin", "local_cores"]

PLUGIN_NAME = "daskml-scale-keras"


def local_cores() -> int:
    """Cores this process may use (cgroup and affinity aware, as Dask counts them)."""
    return int(dask.system.CPU_COUNT)


def _worker_env(threads: int) -> dict[str, str]:
    """Environment that sizes the Keras backend's thread pools before it starts."""
    return backend.current().worker_environ(threads, int(config.get("worker.tensorflow-log-level", 2)))


def _spawn_environ() -> dict[str, Any]:
    """Dask config for the environment a nanny sets *before* it spawns a worker process.

    Dask starts workers with ``MALLOC_TRIM_THRESHOLD_`` set, which also turns off glibc's
    dynamic mmap threshold: every array over 128 KiB is then mmapped and unmapped on each
    allocation, and its pages fault in again every time. Pandas and NumPy preprocessing
    and TensorFlow's CPU kernels allocate such temporaries all the time: a preprocessor
    transform took 28-32 ms instead of 15 ms, a model call 36 ms instead of 25 ms. A fixed
    ``MALLOC_MMAP_THRESHOLD_`` (``daskml_scale.worker.malloc-mmap-threshold``) keeps them
    on the heap; the top of the heap is still trimmed as Dask wants.
    """
    value = config.get("worker.malloc-mmap-threshold", "32MiB")
    if value in (None, False, ""):
        return {}
    return {"distributed.nanny.pre-spawn-environ.MALLOC_MMAP_THRESHOLD_": str(dask.utils.parse_bytes(value))}


class KerasWorkerPlugin(WorkerPlugin):
    """Prepare a worker for Keras/TensorFlow, once, when it joins.

    * TensorFlow's intra-op pool gets the worker's thread count (or the
      ``daskml_scale.worker.tensorflow-threads`` setting), so that N workers x
      threads never oversubscribe the cores;
    * TensorFlow's C++ logs are quieted (``daskml_scale.worker.tensorflow-log-level``);
    * on GPU workers, GPU memory grows on demand instead of being taken whole
      (``daskml_scale.worker.gpu-memory-growth``).

    What was applied is kept in ``worker.data``-free state and can be read back with
    :func:`worker_tensorflow_settings` in a task.
    """

    name = PLUGIN_NAME
    idempotent = True

    def __init__(
        self,
        threads: int | None = None,
        log_level: int | None = None,
        gpu_memory_growth: bool | None = None,
    ) -> None:
        self.threads = threads
        self.log_level = log_level if log_level is not None else config.get("worker.tensorflow-log-level", 2)
        self.gpu_memory_growth = (
            gpu_memory_growth if gpu_memory_growth is not None else config.get("worker.gpu-memory-growth", True)
        )

    def setup(self, worker: Any) -> None:
        threads = int(self.threads or worker.state.nthreads or 1)
        env = _worker_env(threads)
        env["TF_CPP_MIN_LOG_LEVEL"] = str(self.log_level)
        os.environ.update(env)
        settings = backend.current().configure_threads(threads, gpu_memory_growth=bool(self.gpu_memory_growth))
        settings["log_level"] = int(self.log_level)
        settings["backend"] = backend.name()
        worker._daskml_scale_tf = settings  # read back by worker_tensorflow_settings()


def worker_tensorflow_settings(dask_worker: Any = None) -> dict[str, Any]:
    """The TensorFlow settings the plugin applied on this worker.

    Call it in a task, or with ``client.run(worker_tensorflow_settings)``.
    """
    if dask_worker is None:
        from distributed import get_worker

        dask_worker = get_worker()
    worker = dask_worker
    applied = dict(getattr(worker, "_daskml_scale_tf", {}))
    effective = backend.current().effective_threads()
    applied["effective_intra_op"] = effective["intra_op"]
    applied["effective_inter_op"] = effective["inter_op"]
    applied["nthreads"] = worker.state.nthreads
    return applied


# ------------------------------------------------------------------------------ GPUs
def _dask_cuda_installed() -> bool:
    try:
        import dask_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def visible_gpu_count() -> int:
    """Number of CUDA GPUs this process can see (0 when none, or no driver)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    try:
        import pynvml

        pynvml.nvmlInit()
        n = pynvml.nvmlDeviceGetCount()
    except Exception:
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return 0
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return 0
        n = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    if visible is not None:
        n = min(n, len([v for v in visible.split(",") if v.strip()]))
    return n


def _gpu_cluster(gpus: int | str | list[int], threads: int | None, kwargs: dict[str, Any]) -> Any:
    n_visible = visible_gpu_count()
    has_dask_cuda = _dask_cuda_installed()
    if n_visible == 0:
        hint = "" if has_dask_cuda else " (dask-cuda is not installed either: pip install 'daskml_scale[gpu]')"
        raise GPUUnavailableError(
            f"connect(gpus={gpus!r}) asked for GPU workers, but no CUDA GPU is visible to this "
            "process (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them)"
            f"{hint}. Run on a machine with a GPU, or call connect() without gpus= for CPU workers.",
            reason="no-gpu",
        )
    if not has_dask_cuda:
        raise GPUUnavailableError(
            f"connect(gpus={gpus!r}) needs dask-cuda, which is not installed; "
            f"{n_visible} GPU(s) are visible. Install it with: pip install 'daskml_scale[gpu]'",
            reason="dask-cuda-missing",
        )
    from dask_cuda import LocalCUDACluster

    if isinstance(gpus, str) and gpus == "all":
        devices = list(range(n_visible))
    elif isinstance(gpus, int):
        if gpus < 1 or gpus > n_visible:
            raise GPUUnavailableError(
                f"connect(gpus={gpus}) asked for {gpus} GPU(s); {n_visible} are visible.",
                reason="no-gpu",
            )
        devices = list(range(gpus))
    else:
        devices = [int(d) for d in gpus]
    return LocalCUDACluster(
        CUDA_VISIBLE_DEVICES=devices,
        threads_per_worker=threads or 1,
        **kwargs,
    )


class _ClusterOwningClient(Client):
    """A client that closes the cluster :func:`connect` started for it."""

    _owned_cluster: Any = None

    def close(self, *args: Any, **kwargs: Any) -> Any:
        result = super().close(*args, **kwargs)
        if self._owned_cluster is not None:
            cluster, self._owned_cluster = self._owned_cluster, None
            cluster.close()
        return result


# --------------------------------------------------------------------------- connect
def connect(
    address: str | None = None,
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    gpus: int | str | list[int] | None = None,
    sites: dict[str, int] | None = None,
    security: Security | None = None,
    plugin: bool = True,
    timeout: float | str = "30s",
    **cluster_kwargs: Any,
) -> Client:
    """Return a :class:`distributed.Client` on the cluster to use.

    Parameters
    ----------
    address : str, optional
        A scheduler address (``tcp://host:8786``, ``tls://...``). When omitted, the
        address configured the Dask way (``DASK_SCHEDULER_ADDRESS`` or the
        ``scheduler-address`` config key) is used; when neither is set a local
        cluster is started.
    n_workers : int, optional
        Local workers to start. Default: one per core (CPU) or one per GPU.
    threads_per_worker : int, optional
        Threads per local worker. Default 1: small Keras models scale better with
        processes than with threads.
    gpus : int, "all" or list of int, optional
        Start a ``LocalCUDACluster`` (dask-cuda) with one worker per GPU.
    sites : dict of str to int, optional
        Start a local cluster for federated training: ``{"a": 1, "b": 2}`` starts one
        worker process carrying the Dask resource ``site:a=1`` and two carrying
        ``site:b=1`` (see :class:`~daskml_scale.Federated`). Not with ``n_workers``,
        ``gpus`` or an address; on a remote cluster start each site's workers with
        ``dask worker ADDRESS --resources "site:a=1"`` instead.
    security : distributed.security.Security, optional
        TLS settings, passed through to the client (and to a local cluster).
    plugin : bool, default True
        Register :class:`KerasWorkerPlugin` on every worker, present and future.
    timeout : float or str
        How long to wait for a remote scheduler.
    **cluster_kwargs
        Passed to ``LocalCluster`` / ``LocalCUDACluster`` (e.g. ``memory_limit``,
        ``dashboard_address``).

    Returns
    -------
    distributed.Client
        Closing it also closes a cluster that :func:`connect` started.

    Raises
    ------
    ClusterError
        The scheduler cannot be reached.
    GPUUnavailableError
        ``gpus=`` was given but dask-cuda is missing or no GPU is visible.
    ArgumentError
        ``sites=`` is not a non-empty dict of site names to positive worker counts, or
        comes with ``n_workers``, ``gpus`` or an address.

    Examples
    --------
    >>> client = daskml_scale.connect()                      # doctest: +SKIP
    >>> client = daskml_scale.connect("tcp://10.0.0.5:8786")  # doctest: +SKIP
    >>> client = daskml_scale.connect(sites={"a": 1, "b": 2})  # doctest: +SKIP
    """
    if sites is not None:
        _check_sites(sites, address=address, n_workers=n_workers, gpus=gpus)
    if address is None and gpus is None and sites is None:
        address = dask.config.get("scheduler-address", None) or dask.config.get("scheduler_address", None)

    if address is not None:
        if gpus is not None or n_workers is not None or cluster_kwargs:
            raise ArgumentError(
                "Expected either a scheduler address or local cluster options "
                f"(n_workers, gpus, ...), not both. Received: address={address!r}, "
                f"n_workers={n_workers!r}, gpus={gpus!r}, other={sorted(cluster_kwargs)}"
            )
        try:
            client = Client(address, security=security, timeout=timeout)
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"Could not reach the Dask scheduler at {address!r} within {timeout}: {exc}. "
                "Check the address and that `dask scheduler` is running there."
            ) from exc
    elif gpus is not None:
        if security is not None:
            cluster_kwargs.setdefault("security", security)
        with dask.config.set(_spawn_environ()):
            cluster = _gpu_cluster(gpus, threads_per_worker, cluster_kwargs)
        client = _ClusterOwningClient(cluster, security=security)
        client._owned_cluster = cluster
    elif sites is not None:
        client = _sites_client(sites, threads_per_worker or 1, security, cluster_kwargs)
    else:
        threads = threads_per_worker or 1
        if n_workers is None:
            n_workers = max(1, local_cores() // threads)
        cluster_kwargs.setdefault("dashboard_address", ":8787")
        env = {**_worker_env(threads), **cluster_kwargs.pop("env", {})}
        if security is not None:
            cluster_kwargs.setdefault("security", security)
        with dask.config.set(_spawn_environ()):
            cluster = LocalCluster(
                n_workers=n_workers,
                threads_per_worker=threads,
                processes=True,
                env=env,
                **cluster_kwargs,
            )
        client = _ClusterOwningClient(cluster, security=security)
        client._owned_cluster = cluster

    if plugin:
        from daskml_scale._utils import waits

        # the scheduler waits for every worker to run the plugin's setup: bounded, as every wait
        waits.within(
            lambda: client.register_plugin(KerasWorkerPlugin(threads=None)), waits.wait_timeout(),
            "connect(): registering KerasWorkerPlugin on the workers",
            "A worker may be stuck: see its log or restart it, or connect with plugin=False.", client,
        )
    _check_backends(client)
    return client


# ----------------------------------------------------------------- federated sites
def _check_sites(sites: Any, *, address: str | None, n_workers: int | None, gpus: Any) -> None:
    """``sites=`` is a non-empty dict {name: positive worker count}, alone."""
    if address is not None or n_workers is not None or gpus is not None:
        raise ArgumentError(
            "Expected sites= alone: it sets the workers of a local cluster (their number per site). "
            f"Received: sites={sites!r} with address={address!r}, n_workers={n_workers!r}, gpus={gpus!r}")
    if not isinstance(sites, dict) or not sites:
        raise ArgumentError(f"Expected sites to be a non-empty dict {{site name: workers}}, e.g. {{'a': 1, 'b': 2}}. "
                            f"Received: sites={sites!r}")
    for name, count in sites.items():
        if not isinstance(name, str) or not name or any(c in name for c in " \t\n=,:'\""):
            raise ArgumentError(
                "Expected every site name to be a non-empty string without spaces, quotes, '=', ',' or ':' "
                f"(it becomes the resource site:<name>). Received: {name!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ArgumentError(f"Expected a positive number of workers for site {name!r}. Received: {count!r}")


def _sites_client(sites: dict[str, int], threads: int, security: Security | None,
                  cluster_kwargs: dict[str, Any]) -> Client:
    """A LocalCluster of worker processes, each carrying the resource ``site:<name>=1``.

    The cluster starts with no worker; the sites' workers are added as entries of its
    worker spec (``SpecCluster.worker_spec``: the cluster's own worker options plus the
    site's resource), and the cluster is brought to that spec.
    """
    import logging

    from distributed.worker_memory import parse_memory_limit

    total = sum(sites.values())
    if "resources" in cluster_kwargs:
        raise ArgumentError("Expected no resources= with sites=: every site worker carries site:<name>=1. "
                            f"Received: resources={cluster_kwargs['resources']!r}")
    cluster_kwargs.setdefault("dashboard_address", ":8787")
    cluster_kwargs.setdefault("memory_limit", parse_memory_limit("auto", 1, total, logger=logging.getLogger(__name__)))
    env = {**_worker_env(threads), **cluster_kwargs.pop("env", {})}
    if security is not None:
        cluster_kwargs.setdefault("security", security)
    with dask.config.set(_spawn_environ()):
        cluster = LocalCluster(n_workers=0, threads_per_worker=threads, processes=True, env=env, **cluster_kwargs)
        try:
            base = cluster.new_spec
            for site, count in sorted(sites.items()):
                for i in range(count):
                    options = {**base["options"], "resources": {f"site:{site}": 1}}
                    cluster.worker_spec[f"site-{site}-{i}"] = {"cls": base["cls"], "options": options}
            cluster.sync(cluster._correct_state)
        except BaseException:
            cluster.close()
            raise
    client = _ClusterOwningClient(cluster, security=security)
    client._owned_cluster = cluster
    try:
        client.wait_for_workers(total, timeout=max(60.0, 15.0 * total))
    except BaseException:
        client.close()
        raise
    return client


def _keras_backend_name() -> str:
    return backend.name()


def _check_backends(client: Client) -> None:
    """Workers run the driver's Keras backend (``client.keras_backend``); a worker on
    another one is named in the error."""
    from daskml_scale._utils import waits

    here = backend.name()
    found = waits.within(
        lambda: client.run(_keras_backend_name), waits.wait_timeout(), "connect(): asking the workers' Keras backend",
        "A worker may be stuck: see its log or restart it.", client,
    )
    other = {w: b for w, b in found.items() if b != here}
    if other:
        client.close()
        raise ClusterError(
            f"Expected every worker to run the driver's Keras backend {here!r}. Received: "
            + ", ".join(f"{w} runs {b!r}" for w, b in sorted(other.items()))
            + f". Start the workers with KERAS_BACKEND={here}, or set the driver's backend to theirs."
        )
    client.keras_backend = here
