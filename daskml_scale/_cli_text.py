"""The texts of ``daskml-scale``: the epilogs of its commands, the bundle description of ``info``."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["EPILOG_MAIN", "EPILOG_TRAIN", "EPILOG_PREDICT", "EPILOG_INFO", "EPILOG_SERVE", "format_info"]

EPILOG_MAIN = """\
examples:
  # train on CSV files with model averaging on a local cluster (one worker per core)
  daskml-scale train --data 'data/train/*.csv' --target log_price \\
      --transform daskml_scale.datasets:diamonds_transform \\
      --numeric carat depth table x y z volume --categorical cut color clarity \\
      --model model_def.py:build_model --strategy averaging --sync-every 16 \\
      --epochs 5 --batch-size 256 --validation 'data/test/*.csv' --out model.bundle

  # predict file by file (resumable: a rerun skips finished files)
  daskml-scale predict --bundle model.bundle --input 'data/test/*.csv' --output predictions/ --keep id

  # what is in a bundle
  daskml-scale info model.bundle

  # serve it over REST on http://127.0.0.1:8000 (POST /predict, GET /info)
  daskml-scale serve model.bundle

  # the same on a remote cluster with data on S3
  daskml-scale predict --scheduler tcp://scheduler:8786 --bundle s3://models/price.bundle \\
      --input 's3://data/in/*.csv' --output s3://data/out/ \\
      --storage-option client_kwargs.endpoint_url=https://s3.example.com

Run 'daskml-scale COMMAND --help' for the options of a command.
"""

EPILOG_TRAIN = """\
the model (--model):
  FILE.keras            a compiled model saved with model.save("FILE.keras")
  module.py:build_fn    a Python file (or an importable module) with a function
                        build_fn(n_features) -> compiled keras.Model; n_features is
                        the number of columns the fitted preprocessor produces
the transform (--transform):
  module:fn or file.py:fn, a pandas function DataFrame -> DataFrame applied to every
  partition (and at prediction time). An importable module:fn is stored in the bundle
  by name; a function from a file.py is not, so pass --transform again to predict/serve.

examples:
  daskml-scale train --data 'data/train/*.csv' --target log_price \\
      --transform daskml_scale.datasets:diamonds_transform \\
      --numeric carat depth table x y z volume --categorical cut color clarity \\
      --model model_def.py:build_model --epochs 5 --batch-size 256 --sync-every 16 \\
      --validation-fraction 0.1 --checkpoint ckpt/ --out model.bundle

  # model_def.py
  import keras
  def build_model(n_features):
      model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(64, activation="relu"),
                                keras.layers.Dense(1)])
      model.compile(optimizer="adam", loss="mse", metrics=["mae"])
      return model

  # resume an interrupted run from its last checkpoint
  daskml-scale train ... --checkpoint s3://bucket/ckpt/ --resume --out s3://bucket/model.bundle
"""

EPILOG_PREDICT = """\
Each input file becomes one output file under --output (same relative name, new
suffix), written atomically; a rerun skips the files already done and redoes the
others. The exit code is 1 when any file failed.

examples:
  daskml-scale predict --bundle model.bundle --input 'data/test/*.csv' --output predictions/ --keep id
  daskml-scale predict --bundle s3://models/m.bundle --input s3://in/ --output s3://out/ \\
      --format parquet --scheduler tcp://scheduler:8786
"""

EPILOG_INFO = """\
examples:
  daskml-scale info model.bundle
  daskml-scale info s3://models/price.bundle --json | jq .training_summary.final
"""

EPILOG_SERVE = """\
Endpoints: POST /predict (JSON records or CSV), GET /info, GET /health, GET /metrics,
the Open Inference Protocol v2 (/v2/...), TensorFlow Serving (/v1/models/...), MLflow
(/invocations, /ping), POST /jobs (predict_files in the background; needs --scheduler or
--workers, a token and --jobs-allow-read/--jobs-allow-write).

Several models: give several bundles as NAME=URL (a bare URL is named after its file,
price.bundle -> price), or a folder, which serves every *.bundle in it under its file's
name. Every protocol routes by name (/models/NAME/predict, /v2/models/NAME/infer,
/v1/models/NAME:predict); the first model is also the one at /predict.

Reload: SIGHUP reloads every model from its URL, and POST /v2/repository/models/NAME/load
reloads one (from its URL, or {"parameters": {"url": URL}}); the new version takes over
once loaded, no request in flight is dropped, and a bundle that fails to load leaves the
old one serving (the error is in GET /models).

The same command runs as 'python -m daskml_scale.serving BUNDLE_URL [options]'.

examples:
  daskml-scale serve model.bundle --port 8000
  daskml-scale serve price=models/price.bundle cut=models/cut.bundle
  daskml-scale serve models/                  # every *.bundle in the folder
  kill -HUP <pid>                             # reload them all from their files
  curl -s localhost:8000/predict -H 'content-type: application/json' \\
      -d '[{"carat": 0.3, "cut": "Ideal", "color": "E", "clarity": "SI1", "depth": 61.5, "table": 55, "x": 4.3, "y": 4.3, "z": 2.7}]'
"""


def format_info(url: str, info: dict[str, Any]) -> str:
    """The text of ``daskml-scale info``: what a bundle holds, for a person."""
    lines = [f"bundle   {url}"]
    versions = ", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items())
    lines.append(f"created  {info.get('created')}  ({info.get('format')} v{info.get('format_version')}; {versions})")
    lines.append(f"task     {info.get('task')}, target {info.get('target')!r} -> outputs {info.get('output_names')}")
    if info.get("classes"):
        lines.append(f"classes  {info['classes']}")
    feats = info.get("feature_names") or []
    lines.append(f"features ({len(feats)}): {', '.join(feats)}")
    schema = info.get("input_schema") or {}
    lines.append(f"input schema ({len(schema)} columns):")
    width = max((len(c) for c in schema), default=0)
    lines += [f"  {c:<{width}}  {t}" for c, t in schema.items()]
    ts = info.get("training_summary") or {}
    if ts:
        head = ", ".join(
            f"{k} {ts[k]}" for k in ("strategy", "sync_every", "outer_lr", "epochs_run", "batch_size", "workers",
                                      "partitions", "train_rows", "validation_rows") if k in ts
        )
        lines.append(f"training {head}")
        final = ts.get("final") or {}
        if final:
            lines.append("metrics  " + ", ".join(
                f"{k} {v:.5g}" if isinstance(v, (int, float)) else f"{k} {v}" for k, v in final.items()))
        hist = ts.get("history") or {}
        keys = [k for k, v in hist.items() if isinstance(v, list) and v]
        if keys:
            lines.append("history  epoch  " + "  ".join(f"{k:>10s}" for k in keys))
            for e in range(max(len(hist[k]) for k in keys)):
                vals = "  ".join(f"{hist[k][e]:>10.5g}" if e < len(hist[k]) else " " * 10 for k in keys)
                lines.append(f"         {e + 1:>5d}  {vals}")
        if ts.get("lost_workers"):
            lines.append(f"lost workers during training: {ts['lost_workers']}")
    else:
        lines.append("training (no summary stored)")
    if (info.get("code") or {}).get("files"):
        lines.append(f"code     {', '.join(info['code']['files'])} (loads only with --unsafe)")
    if info.get("metadata"):
        lines.append(f"metadata {json.dumps(info['metadata'], default=str)}")
    lines.append(f"sha256   {info.get('content_hash')}")
    return "\n".join(lines)
