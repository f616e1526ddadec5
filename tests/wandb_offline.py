"""Read back what W&B wrote offline (the run-*.wandb transaction log), as a user's `wandb sync` would.

wandb >= 0.19 no longer ships a Python reader, so this parses the framing itself: a 7-byte file header
(':W&B', magic 0xBEE1, version), then LevelDB-log records in 32 KiB blocks, each with a 7-byte header
(crc32, length, type: 1 full, 2 first, 3 middle, 4 last) holding one serialised protobuf ``Record``.
"""

from __future__ import annotations

import json
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


def read_run(root: Path) -> dict:
    """History rows, summary, config, the run's own fields (name, group, job_type) and the log's path, of the one
    offline run under ``root``."""
    files = sorted(Path(root).rglob("offline-run-*/run-*.wandb"))
    if len(files) != 1:
        raise AssertionError(f"expected one offline W&B run under {root}, found {files}")
    history, summary, config, run = [], {}, {}, {}
    for payload in _payloads(files[0].read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = {"name": record.run.display_name, "group": record.run.run_group, "job_type": record.run.job_type}
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "config":
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.config.update})
    return {"history": history, "summary": summary, "config": config, "run": run, "path": files[0]}
