"""Read back what W&B wrote offline (the run-*.wandb transaction log), as a user's `wandb sync` would.

wandb >= 0.19 no longer ships a Python reader, so this parses the framing itself: a 7-byte file header
(':W&B', magic 0xBEE1, version), then LevelDB-log records in 32 KiB blocks, each with a 7-byte header
(crc32, length, type: 1 full, 2 first, 3 middle, 4 last) holding one serialised protobuf ``Record``.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768


def _payloads(raw: bytes):
    if raw[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding up to the end of the block
            pos += left - 7
            continue
        data, pos = raw[pos : pos + length], pos + length
        if kind == 1:
            yield data
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            yield pending + data


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
    for payload in _payloads(Path(path).read_bytes()):
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
