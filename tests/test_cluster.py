from __future__ import annotations

import os
import urllib.request

import dask
import pandas as pd
import pytest
from distributed.security import Security

import daskml_scale
from daskml_scale.cluster import KerasWorkerPlugin, worker_tensorflow_settings
from daskml_scale.exceptions import ArgumentError, ClusterError, GPUUnavailableError


def _whereami():
    from distributed import get_worker

    return get_worker().address


def test_local_cluster_has_two_worker_processes(client):
    info = client.scheduler_info()
    assert len(info["workers"]) == 2
    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2
    assert os.getpid() not in pids.values()
    # the dashboard is reachable from the client
    with urllib.request.urlopen(client.dashboard_link, timeout=30) as response:
        assert response.status == 200


def _tensorflow_on_this_worker() -> dict:
    """What TensorFlow itself reports in the worker process (not the plugin's record)."""
    import tensorflow as tf

    return {
        "intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL"),
    }


def test_worker_plugin_sizes_tensorflow_to_worker_threads(client):
    # TensorFlow reports 0 ("its own choice") for a pool nobody sized
    reported = client.run(_tensorflow_on_this_worker)
    assert len(reported) == 2
    assert [(r["intra_op"], r["inter_op"]) for r in reported.values()] == [(1, 1)] * 2  # 1 thread per worker
    settings = client.run(worker_tensorflow_settings)
    assert all(s["nthreads"] == 1 and s["effective_intra_op"] == 1 for s in settings.values())


def test_worker_plugin_applies_its_own_settings():
    """A worker with 2 threads and a plugin asking for log level 1: the suite's and
    connect()'s environment say TF_CPP_MIN_LOG_LEVEL=2 and nobody else sizes the pools."""
    with daskml_scale.connect(n_workers=1, threads_per_worker=2, dashboard_address=None, plugin=False) as c:
        assert set(c.run(lambda: os.environ.get("TF_CPP_MIN_LOG_LEVEL")).values()) == {"2"}
        c.register_plugin(KerasWorkerPlugin(log_level=1))
        (reported,) = c.run(_tensorflow_on_this_worker).values()
    assert reported == {"intra_op": 2, "inter_op": 2, "TF_CPP_MIN_LOG_LEVEL": "1"}


def test_connect_sizes_local_cluster_to_machine():
    with daskml_scale.connect(threads_per_worker=1, dashboard_address=None, plugin=False) as c:
        assert len(c.scheduler_info()["workers"]) == daskml_scale.cluster.local_cores()
        cluster = c._owned_cluster
    assert cluster.status.name == "closed"  # closing the client closed its cluster


def test_connect_to_remote_scheduler_process(remote_cluster):
    with daskml_scale.connect(remote_cluster.address) as c:
        workers = list(c.scheduler_info()["workers"])
        assert len(workers) == 1
        assert c.submit(_whereami, pure=False).result() == workers[0]
        # the worker lives in another OS process than this test
        pid = c.submit(os.getpid, pure=False).result()
        assert pid != os.getpid()


def test_connect_uses_dask_config_scheduler_address(remote_cluster):
    with dask.config.set({"scheduler-address": remote_cluster.address}):
        with daskml_scale.connect() as c:
            assert c.scheduler.address == remote_cluster.address
            assert c.submit(lambda x: x + 1, 1).result() == 2


def test_connect_unreachable_scheduler_is_clear():
    from tests.conftest import free_port

    addr = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(ClusterError, match="Could not reach the Dask scheduler"):
        daskml_scale.connect(addr, timeout="2s", plugin=False)


def test_connect_rejects_address_plus_local_options():
    with pytest.raises(ArgumentError, match="not both") as err:
        daskml_scale.connect("tcp://127.0.0.1:1", n_workers=2)
    assert isinstance(err.value, ValueError)


def test_connect_gpus_without_gpu_is_clear(monkeypatch):
    # this machine has no GPU; CUDA_VISIBLE_DEVICES="" makes that true anywhere
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(GPUUnavailableError) as err:
        daskml_scale.connect(gpus=1)
    assert err.value.reason == "no-gpu"
    assert "no CUDA GPU is visible" in str(err.value)
    assert isinstance(err.value, RuntimeError)


def test_connect_gpus_without_dask_cuda_names_the_install(monkeypatch):
    import daskml_scale.cluster as cl

    try:
        import dask_cuda  # noqa: F401

        pytest.skip("dask-cuda is installed here")
    except ImportError:
        pass
    monkeypatch.setattr(cl, "visible_gpu_count", lambda: 1)  # pretend a GPU is there
    with pytest.raises(GPUUnavailableError) as err:
        daskml_scale.connect(gpus=1)
    assert err.value.reason == "dask-cuda-missing"
    assert "pip install 'daskml_scale[gpu]'" in str(err.value)


@pytest.mark.gpu
def test_connect_gpus_starts_one_worker_per_gpu():
    n = daskml_scale.cluster.visible_gpu_count()
    if n == 0:
        pytest.skip("no GPU on this machine")
    pytest.importorskip("dask_cuda")
    with daskml_scale.connect(gpus="all") as c:
        assert len(c.scheduler_info()["workers"]) == n
        settings = c.run(worker_tensorflow_settings)
        assert all(len(s["gpus"]) == 1 for s in settings.values())


def test_connect_tls_scheduler_process(tls_cluster):
    sec = tls_cluster.security()
    with daskml_scale.connect(tls_cluster.address, security=sec) as c:
        assert c.scheduler.address.startswith("tls://")
        assert c.submit(lambda x: x * 2, 21).result() == 42
    # without the certificates the TLS scheduler cannot be used
    with pytest.raises(ClusterError, match="Could not reach the Dask scheduler"):
        daskml_scale.connect(tls_cluster.address.replace("tls://", "tcp://"), timeout="3s", plugin=False)


def test_temporary_security_local_cluster():
    sec = Security.temporary()
    with daskml_scale.connect(n_workers=1, security=sec, dashboard_address=None, plugin=False) as c:
        assert c.scheduler.address.startswith("tls://")
        assert c.submit(lambda: 7).result() == 7


def test_s3_server_round_trip_csv(s3):
    df = pd.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    url = s3.url("roundtrip.csv")
    df.to_csv(url, index=False, storage_options=s3.storage_options)
    back = pd.read_csv(url, storage_options=s3.storage_options)
    pd.testing.assert_frame_equal(back, df, check_dtype=False)
    assert s3.filesystem().exists(url)


def test_config_defaults_are_dask_config():
    assert dask.config.get("daskml_scale.io.on-bad-rows") == "error"
    with dask.config.set({"daskml_scale.predict.batch-size": 123}):
        assert daskml_scale.config.get("predict.batch-size") == 123


def _mmapped_regions_for_a_temporary() -> int | None:
    """How many new mmapped regions glibc's malloc holds while a task holds a 2 MiB array
    (None where glibc's mallinfo2 is not available)."""
    import ctypes

    import numpy as np

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    before = mallinfo2().hblks
    a = np.ones(1 << 18)
    during = mallinfo2().hblks
    del a
    return int(during - before)


def test_workers_keep_large_temporaries_off_mmap(client, monkeypatch):
    """connect() starts workers with a fixed glibc mmap threshold: Dask's trim setting
    alone turns the dynamic one off, and every array over 128 KiB is then mmapped (and
    unmapped when freed), which made pandas/NumPy/TensorFlow work on workers up to ~2x
    slower than in a plain process."""
    envs = client.run(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    assert set(envs.values()) == {str(32 * 2**20)}
    # a nanny leaves its pre-spawn variables in this process's environment: children inherit them
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    with dask.config.set({"daskml_scale.worker.malloc-mmap-threshold": None}):
        with daskml_scale.connect(n_workers=1, dashboard_address=None, plugin=False) as plain:
            assert set(plain.run(lambda: os.environ.get("MALLOC_MMAP_THRESHOLD_")).values()) == {None}
            mapped_plain = plain.submit(_mmapped_regions_for_a_temporary, pure=False).result()
    if mapped_plain is None:
        pytest.skip("not glibc: no mallinfo2 to read")
    assert mapped_plain == 1  # Dask's default: the array got its own mapping
    assert client.submit(_mmapped_regions_for_a_temporary, pure=False).result() == 0  # ours: from the heap


def _my_resources(dask_worker):
    return dict(dask_worker.state.total_resources)


def test_connect_sites_starts_workers_per_site():
    from daskml_scale.training.federated import site_workers

    with daskml_scale.connect(sites={"a": 1, "b": 2}, dashboard_address=None, plugin=False) as c:
        assert {s: len(w) for s, w in site_workers(c).items()} == {"a": 1, "b": 2}
        assert len(set(c.run(os.getpid).values())) == 3  # a process each
        names = {info["name"] for info in c.scheduler_info(n_workers=-1)["workers"].values()}
        assert names == {"site-a-0", "site-b-0", "site-b-1"}
        # a task that asks for a site's resource runs on that site's workers only
        for site, workers in site_workers(c).items():
            futs = [c.submit(_whereami, pure=False, resources={f"site:{site}": 1}) for _ in range(4)]
            assert set(c.gather(futs)) <= set(workers)
        assert sorted(c.run(_my_resources).values(), key=str) == [{"site:a": 1}, {"site:b": 1}, {"site:b": 1}]
        cluster = c._owned_cluster
    assert cluster.status.name == "closed"


@pytest.mark.parametrize("kwargs, match", [
    ({"sites": {}}, "non-empty dict"),
    ({"sites": ["a", "b"]}, "non-empty dict"),
    ({"sites": {"a": 0}}, "positive number of workers for site 'a'"),
    ({"sites": {"a": 1.5}}, "positive number of workers"),
    ({"sites": {"a": True}}, "positive number of workers"),
    ({"sites": {"a b": 1}}, "site name"),
    ({"sites": {"a=1": 1}}, "site name"),
    ({"sites": {"": 1}}, "site name"),
    ({"sites": {"a": 1}, "n_workers": 2}, "sites= alone"),
    ({"sites": {"a": 1}, "gpus": 1}, "sites= alone"),
    ({"sites": {"a": 1}, "address": "tcp://127.0.0.1:1"}, "sites= alone"),
    ({"sites": {"a": 1}, "resources": {"GPU": 1}}, "no resources="),
])
def test_connect_sites_bad_values_are_clear(kwargs, match):
    with pytest.raises(ArgumentError, match=match) as err:
        daskml_scale.connect(plugin=False, **kwargs)
    assert isinstance(err.value, ValueError)
