"""Read back what W&B wrote offline (the run-*.wandb transaction log), as a user's `wandb sync` would.

wandb >= 0.19 no longer ships a Python reader; the framing (checksums verified) is diffusion.wandb_folder's,
which `python -m diffusion sync` rewrites moved logs with. Each record is one serialised protobuf ``Record``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from wandb.proto import wandb_internal_pb2

from diffusion.wandb_folder import read_payloads


def read_runs(root: Path) -> list[dict]:
    """Every offline run under ``root`` (one per start: a resumed run writes another folder), oldest first."""
    files = sorted(Path(root).rglob("offline-run-*/run-*.wandb"), key=lambda f: f.parent.name)
    return [read_log(f) for f in files]


def read_run(root: Path) -> dict:
    """The one offline run under ``root`` (see ``read_log``)."""
    files = sorted(Path(root).rglob("offline-run-*/run-*.wandb"))
    if len(files) != 1:
        raise AssertionError(f"expected one offline W&B run under {root}, found {files}")
    return read_log(files[0])


def read_log(path: Path) -> dict:
    """History rows, summary, config, the run's own fields (id, name, group, job_type, tags), its metric
    definitions, the artifacts it logged (name, type and files: path in the artifact -> file staged on disk) and
    the log's path."""
    history, summary, config, run, metrics, artifacts = [], {}, {}, {}, {}, []
    for payload in read_payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"id": record.run.run_id, "name": record.run.display_name, "group": record.run.run_group,
                   "job_type": record.run.job_type, "tags": list(record.run.tags)}
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
        elif kind == "metric":
            m = record.metric
            metrics[m.name or m.glob_name] = {"step_metric": m.step_metric, "min": m.summary.min}
        elif kind == "artifact":
            a = record.artifact
            artifacts.append({"name": a.name, "type": a.type, "metadata": json.loads(a.metadata or "{}"),
                              "files": {e.path: e.local_path for e in a.manifest.contents}})
    return {"history": history, "summary": summary, "config": config, "run": run, "metrics": metrics,
            "artifacts": artifacts, "path": Path(path)}


def table_rows(run: dict, key: str) -> list[dict]:
    """The rows of the W&B table ``key`` as dicts by column (an image cell: the path of its PNG on disk): all rows
    of an incremental table (each log adds its new rows), the last version of any other."""
    name = key.replace("/", "")  # W&B names the table's artifact run-<id>-[incr-]<key without slashes>-<6 characters>
    versions = [a for a in run["artifacts"]
                if a["type"] in ("wandb-run-incremental-table", "run_table") and re.fullmatch(rf"run-\w+-(incr-)?{re.escape(name)}-[\w-]{{6}}", a["name"])]
    if versions and versions[0]["type"] == "run_table":
        versions = versions[-1:]
    rows = []
    for artifact in versions:
        (table,) = [p for p in artifact["files"] if p.endswith(".table.json")]
        logged = json.loads(Path(artifact["files"][table]).read_text())
        for data in logged["data"]:
            row = dict(zip(logged["columns"], data))
            rows.append({k: Path(artifact["files"][v["path"]]) if isinstance(v, dict) and "path" in v else v
                         for k, v in row.items()})
    return rows
