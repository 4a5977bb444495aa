"""Real components for the tests: a shared LocalCluster with worker processes, a
scheduler and a worker started as their own OS processes (plain and TLS), and an
S3-compatible server (moto's server mode) on loopback."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# credentials for the loopback S3 server only; never real ones
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import pytest  # noqa: E402
from distributed import Client  # noqa: E402

import daskml_scale  # noqa: E402

DASK_BIN = str(Path(sys.executable).with_name("dask"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class ProcessCluster:
    """`dask scheduler` + `dask worker` as separate OS processes on 127.0.0.1."""

    def __init__(
        self, logdir: Path, n_workers: int = 1, tls: dict[str, str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.protocol = "tls" if tls else "tcp"
        self.address = f"{self.protocol}://127.0.0.1:{self.port}"
        self.tls = tls
        tls_args: list[str] = []
        if tls:
            tls_args = ["--tls-ca-file", tls["ca"], "--tls-cert", tls["cert"], "--tls-key", tls["key"]]
        # the test modules' functions are pickled by reference: let the workers import them
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
               **(env or {})}
        self.procs: list[subprocess.Popen] = []
        sched_cmd = [
            DASK_BIN, "scheduler", "--host", "127.0.0.1", "--port", str(self.port),
            "--protocol", self.protocol, "--no-dashboard", *tls_args,
        ]
        self.procs.append(
            subprocess.Popen(sched_cmd, stdout=open(logdir / "scheduler.log", "w"), stderr=subprocess.STDOUT, env=env)
        )
        wait_for_port(self.port, proc=self.procs[0])
        for i in range(n_workers):
            worker_cmd = [
                DASK_BIN, "worker", self.address, "--host", "127.0.0.1", "--nthreads", "1",
                "--nworkers", "1", "--no-dashboard", "--memory-limit", "4GiB", *tls_args,
            ]
            self.procs.append(
                subprocess.Popen(
                    worker_cmd, stdout=open(logdir / f"worker-{i}.log", "w"), stderr=subprocess.STDOUT, env=env
                )
            )

    def security(self):
        from distributed.security import Security

        if not self.tls:
            return None
        return Security(
            tls_ca_file=self.tls["ca"],
            tls_client_cert=self.tls["cert"],
            tls_client_key=self.tls["key"],
            require_encryption=True,
        )

    def wait_for_workers(self, n: int, timeout: float = 120) -> None:
        with Client(self.address, security=self.security(), timeout="30s") as c:
            c.wait_for_workers(n, timeout=timeout)

    def close(self) -> None:
        _stop(self.procs)


# ------------------------------------------------------------------ local cluster
def _two_worker_cluster():
    """A real LocalCluster: 2 worker processes x 1 thread, waited for."""
    c = daskml_scale.connect(n_workers=2, threads_per_worker=1, dashboard_address=":0", memory_limit="4GiB")
    try:
        c.wait_for_workers(2, timeout=120)
    except Exception:
        c.close()
        raise
    return c


@pytest.fixture(scope="session")
def client():
    """Shared by the tests of the session that can share it."""
    c = _two_worker_cluster()
    yield c
    c.close()


@pytest.fixture
def own_client():
    """A private cluster, for tests that kill workers."""
    c = _two_worker_cluster()
    yield c
    c.close()


# ---------------------------------------------------------------- remote clusters
@pytest.fixture(scope="session")
def remote_cluster(tmp_path_factory):
    """A scheduler and one worker, each its own OS process, on free loopback ports."""
    cluster = ProcessCluster(tmp_path_factory.mktemp("remote"), n_workers=1)
    try:
        cluster.wait_for_workers(1)
        yield cluster
    finally:
        cluster.close()


def make_tls_files(directory: Path) -> dict[str, str]:
    """A CA and a certificate for 127.0.0.1/localhost signed by it, written as PEM."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "daskml-scale test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return {k: str(v) for k, v in paths.items()}


@pytest.fixture(scope="session")
def tls_cluster(tmp_path_factory):
    """A TLS-only scheduler and worker as OS processes, with certificates made here."""
    d = tmp_path_factory.mktemp("tls")
    cluster = ProcessCluster(d, n_workers=1, tls=make_tls_files(d))
    try:
        cluster.wait_for_workers(1)
        yield cluster
    finally:
        cluster.close()


# ------------------------------------------------------------------------- S3
class S3Server:
    def __init__(self, endpoint: str, bucket: str) -> None:
        self.endpoint = endpoint
        self.bucket = bucket
        self.storage_options = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }

    def url(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])

    def filesystem(self):
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)
        return fs


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a loopback port, with a bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_port(port)
    # s3fs's mkdir sends a location constraint moto rejects: make the bucket with boto3
    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="testing",
        aws_secret_access_key="testing", region_name="us-east-1",
    ).create_bucket(Bucket="daskml-test")
    try:
        yield S3Server(endpoint, "daskml-test")
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, request):
    """The S3 server with a fresh prefix per test: ``s3.url("x.csv")`` is unique to it."""
    prefix = request.node.name.replace("[", "_").replace("]", "_")

    class _Scoped(S3Server):
        def url(self, *parts: str) -> str:
            return "s3://" + "/".join([self.bucket, prefix, *parts])

    return _Scoped(s3_server.endpoint, s3_server.bucket)
