"""``python -m daskml_scale.serving BUNDLE_URL [--port 8000] ...``: run the server.

The project's CLI (``daskml-scale serve``) is the user-facing command; this entry
exists so that a server can be started with nothing but the package.
"""

from __future__ import annotations

import argparse
import sys

import daskml_scale  # noqa: F401  (sets the Keras backend and the config defaults)
from daskml_scale.serving import serve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daskml_scale.serving", description="Serve a bundle over REST.")
    p.add_argument("bundle_url")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--scheduler", default=None, help="Dask scheduler address for POST /jobs")
    p.add_argument("--max-batch-rows", type=int, default=None)
    p.add_argument("--max-wait-ms", type=float, default=None)
    p.add_argument("--no-micro-batching", action="store_true", help="one model call per request")
    p.add_argument("--max-body-bytes", type=int, default=None)
    p.add_argument("--id-column", default=None)
    p.add_argument("--tf-threads", type=int, default=None)
    p.add_argument("--log-level", default="warning")
    p.add_argument("--no-gc-freeze", action="store_true", help="keep the garbage collector walking every object")
    args = p.parse_args(argv)
    serve(
        args.bundle_url, host=args.host, port=args.port, scheduler=args.scheduler,
        max_batch_rows=args.max_batch_rows, max_wait_ms=args.max_wait_ms,
        micro_batching=not args.no_micro_batching, max_body_bytes=args.max_body_bytes,
        id_column=args.id_column, tf_threads=args.tf_threads, log_level=args.log_level,
        freeze_gc=not args.no_gc_freeze,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
