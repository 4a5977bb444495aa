"""Locked doors: the bearer token, batch jobs off unless configured, job URLs under
allowed prefixes only, and HTTPS with a certificate made in the test."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from daskml_scale.exceptions import ArgumentError
from daskml_scale.serving import create_app
from daskml_scale.serving.auth import ForbiddenError, check_url, load_token

from .conftest import free_port, make_tls_files
from .test_serving_protocols import _frame, bundle, bundle_url, run, table  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token"


def test_every_endpoint_but_the_health_checks_needs_the_token(bundle, table):
    recs = _frame(table, 0, 2).to_dict("records")
    good = {"authorization": f"Bearer {TOKEN}"}

    async def go(c):
        out = {}
        for path in ("/health", "/v2/health/live", "/v2/health/ready", "/ping", "/models/diamonds/health"):
            out[f"open {path}"] = await c.get(path)
        for method, path, body in (
            ("POST", "/predict", recs), ("POST", "/v2/models/diamonds/infer", {"inputs": []}),
            ("POST", "/v1/models/diamonds:predict", {"instances": recs}), ("POST", "/invocations", {"instances": recs}),
            ("GET", "/info", None), ("GET", "/metrics", None), ("GET", "/openapi.json", None), ("GET", "/models", None),
            ("POST", "/jobs", {"input": "/etc/passwd", "output": "/tmp/x"}),
            ("POST", "/v2/repository/models/diamonds/load", None),
        ):
            out[f"none {path}"] = await c.request(method, path, json=body)
            out[f"wrong {path}"] = await c.request(method, path, json=body, headers={"authorization": "Bearer nope"})
        out["ok /predict"] = await c.post("/predict", json=recs, headers=good)
        out["ok /v1"] = await c.post("/v1/models/diamonds:predict", json={"instances": recs}, headers=good)
        out["ok /info"] = await c.get("/info", headers=good)
        return out

    out = run(create_app(bundle, model_name="diamonds", token=TOKEN), go)
    for k, r in out.items():
        if k.startswith("open"):
            assert r.status_code == 200, (k, r.text)
        elif k.startswith(("none", "wrong")):
            assert r.status_code == 401, (k, r.status_code, r.text)
            assert "Bearer" in r.json()["error"] and r.headers["www-authenticate"].startswith("Bearer")
        else:
            assert r.status_code == 200, (k, r.text)
    assert out["ok /info"].json()["serving"]["token"] is True
    assert out["ok /info"].json()["serving"]["jobs"] is False  # no cluster, no prefixes


def test_the_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    f = tmp_path / "token"
    f.write_text(f"{TOKEN}\n")
    monkeypatch.delenv("DASKML_SCALE_SERVE_TOKEN", raising=False)
    assert load_token() is None
    assert load_token(token_file=str(f)) == TOKEN
    monkeypatch.setenv("DASKML_SCALE_SERVE_TOKEN", "from-env")
    assert load_token() == "from-env"
    assert load_token("given") == "given"
    with pytest.raises(ArgumentError, match="Cannot read the token file"):
        load_token(token_file=str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ArgumentError, match="non-empty"):
        load_token(token_file=str(tmp_path / "empty"))


def test_job_urls_must_stay_under_the_allowed_prefixes(tmp_path):
    data, out, secret = tmp_path / "data", tmp_path / "out", tmp_path / "secret"
    for d in (data, out, secret):
        d.mkdir()
    (data / "link").symlink_to(secret)  # a symlink inside the allowed folder that leaves it
    read, write = [str(data), "s3://bucket/in"], [str(out)]
    for url in (str(data / "a.csv"), str(data / "*.csv"), str(data / "sub" / "x-*.parquet"), "s3://bucket/in/x/*.csv",
                str(data)):
        check_url(url, read, "input")
    check_url(str(out / "new-folder"), write, "output")
    refused = [
        (str(secret / "a.csv"), read, "input"),
        (str(data / ".." / "secret" / "a.csv"), read, "input"),
        (str(data / "link" / "a.csv"), read, "input"),
        (str(data) + "-other/a.csv", read, "input"),  # a sibling whose name starts like the prefix
        ("s3://bucket/in/../private/a.csv", read, "input"),
        ("s3://bucket/inside/a.csv", read, "input"),
        ("gcs://bucket/in/a.csv", read, "input"),
        (f"file://{secret}/a.csv", read, "input"),
        (str(data / "a.csv"), write, "output"),
        (str(out / ".." / "secret"), write, "output"),
        (str(out / "a"), [], "output"),
    ]
    for url, prefixes, what in refused:
        with pytest.raises(ForbiddenError) as err:
            check_url(url, prefixes, what)
        assert err.value.status == 403 and url in str(err.value), url


def test_jobs_are_off_unless_a_token_and_prefixes_are_set(bundle, tmp_path):
    job = {"input": str(tmp_path / "in" / "*.csv"), "output": str(tmp_path / "out")}
    auth = {"authorization": f"Bearer {TOKEN}"}

    def post(app, body, headers=None):
        async def go(c):
            r = await c.post("/jobs", json=body, headers=headers or {})
            return r, (await c.get("/jobs", headers=headers or {})).json()["jobs"]

        return run(app, go)

    sched = "tcp://127.0.0.1:1"  # never reached: every request below is refused first
    no_token, _ = post(create_app(bundle, scheduler=sched, jobs_allow_read=[str(tmp_path)],
                                                jobs_allow_write=[str(tmp_path)]), job)
    assert no_token.status_code == 403 and "token" in no_token.json()["error"]
    no_prefix, _ = post(create_app(bundle, scheduler=sched, token=TOKEN), job, auth)
    assert no_prefix.status_code == 403 and "allow-read" in no_prefix.json()["error"]
    app = lambda: create_app(bundle, scheduler=sched, token=TOKEN, jobs_allow_read=[str(tmp_path / "in")],  # noqa: E731
                             jobs_allow_write=[str(tmp_path / "out")])
    escape, listed = post(app(), {**job, "input": str(tmp_path / "in" / ".." / ".." / "etc" / "passwd")}, auth)
    assert escape.status_code == 403 and escape.json()["field"] == "input" and listed == []
    overwrite, listed = post(app(), {**job, "output": str(tmp_path / "in"), "overwrite": True}, auth)
    assert overwrite.status_code == 403 and overwrite.json()["field"] == "output" and listed == []


@pytest.mark.parametrize("how", ["python", "cli"])
def test_https_with_a_certificate_made_here(bundle_url, tmp_path, how):
    tls = make_tls_files(tmp_path)
    port = free_port()
    if how == "python":
        code = (f"import daskml_scale; daskml_scale.serve({bundle_url!r}, port={port}, ssl_certfile={tls['cert']!r}, "
                f"ssl_keyfile={tls['key']!r}, token='tls-token')")
        argv = [sys.executable, "-c", code]
    else:  # the command line: the token from a file
        (tmp_path / "token").write_text("tls-token\n")
        argv = [sys.executable, "-m", "daskml_scale", "serve", bundle_url, "--port", str(port), "--ssl-certfile",
                tls["cert"], "--ssl-keyfile", tls["key"], "--token-file", str(tmp_path / "token"), "-q"]
    proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=tls["ca"], timeout=10) as c:
            while True:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the HTTPS server did not become ready"
                time.sleep(0.2)
            r = c.get("/info", headers={"authorization": "Bearer tls-token"})
            assert r.status_code == 200 and r.json()["serving"]["token"] is True
        with pytest.raises(httpx.TransportError):  # no plain HTTP on that port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).raise_for_status()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
