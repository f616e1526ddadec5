"""A run folder that holds its whole W&B offline run, and can be moved before ``wandb sync``.

W&B copies each file of an artifact (the evaluation table's JSON and images, a checkpoint) into a staging folder
under ``$WANDB_DATA_DIR`` (by default the home's ``~/.local/share/wandb``), and its offline log records each
copy by absolute path. A run folder copied off a cluster node therefore arrives without the table's images, and
``wandb sync`` of it fails on every artifact (wandb/wandb#3098; W&B offers no relocation). So:

- ``keep_staging_in`` points ``WANDB_DATA_DIR`` into the run's ``wandb/`` folder (unless the user set it), so the
  folder holds every file ``wandb sync`` reads;
- ``relocate`` rewrites, in a moved folder's offline logs, the artifact paths that pointed into the folder's old
  place so that they point into its new one (the log's framing is LevelDB's, below);
- ``python -m diffusion sync RUN_DIR`` does that, then runs ``wandb sync`` on the run's offline folders in order.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Iterator, Optional

DATA_DIR = "data"  # <save dir>/wandb/data/artifacts/staging: inside the folder `wandb sync` is pointed at
_ours: Optional[str] = None  # the WANDB_DATA_DIR this process set (a later run in the process moves it on)


def keep_staging_in(wandb_dir: Path) -> Optional[Path]:
    """Point W&B's staging at ``wandb_dir/data`` unless the user set ``WANDB_DATA_DIR``; the folder used."""
    global _ours
    current = os.environ.get("WANDB_DATA_DIR")
    if current and current != _ours:
        return Path(current)  # the user's choice
    _ours = str(Path(wandb_dir).resolve() / DATA_DIR)
    os.environ["WANDB_DATA_DIR"] = _ours
    return Path(_ours)


# --- the offline log's framing: a 7-byte header, then LevelDB log records in 32 KiB blocks -----------------
# Each record: crc32 (zlib's, over the type byte and the data), length (2 bytes), type (1 full, 2 first,
# 3 middle, 4 last), data; a block's last < 7 bytes are zeros. wandb >= 0.19 ships no Python reader or writer.
BLOCK = 32768
HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class LogError(ValueError):
    pass


def read_payloads(raw: bytes) -> Iterator[bytes]:
    """Each serialized record of an offline log, its checksums verified."""
    if raw[:4] != b":W&B":
        raise LogError("not a W&B offline log (no ':W&B' header)")
    pos, pending = HEADER_LEN, b""
    while pos + HEADER_LEN <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < HEADER_LEN:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos: pos + HEADER_LEN])
        pos += HEADER_LEN
        if kind == 0 and length == 0:  # zeros up to the end of the block
            pos += left - HEADER_LEN
            continue
        data, pos = raw[pos: pos + length], pos + length
        if len(data) < length or zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise LogError(f"damaged record at byte {pos - length - HEADER_LEN}")
        if kind == FULL:
            yield data
        elif kind == FIRST:
            pending = data
        elif kind == MIDDLE:
            pending += data
        elif kind == LAST:
            yield pending + data
        else:
            raise LogError(f"unknown record type {kind} at byte {pos - length - HEADER_LEN}")


def write_log(header: bytes, payloads) -> bytes:
    """The log of ``payloads`` after ``header``, framed as W&B frames it."""
    out = bytearray(header)
    for data in payloads:
        first = True
        while True:
            left = BLOCK - len(out) % BLOCK
            if left < HEADER_LEN:
                out += b"\0" * left
                left = BLOCK
            chunk, data = data[: left - HEADER_LEN], data[left - HEADER_LEN:]
            kind = (FULL if not data else FIRST) if first else (LAST if not data else MIDDLE)
            out += struct.pack("<IHB", zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, len(chunk), kind)
            out += chunk
            first = False
            if not data:
                break
    return bytes(out)


# --- moving a run folder -------------------------------------------------------------------------------------
def offline_logs(run_dir: Path) -> list[Path]:
    """The run's offline logs, oldest start first (a resumed run writes one folder per start)."""
    return sorted(Path(run_dir).rglob("offline-run-*/run-*.wandb"), key=lambda f: f.parent.name)


def _moved(local_path: str, wandb_dir: Path) -> Optional[str]:
    """Where a staged file recorded at ``local_path`` lies now, if the folder it was staged in moved with the
    run: the part of the path from ``wandb/data/`` on, under this ``wandb_dir``."""
    parts = Path(local_path).parts
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] == DATA_DIR and parts[i - 1] == "wandb":
            candidate = wandb_dir / DATA_DIR / Path(*parts[i + 1:])
            return str(candidate) if candidate.is_file() else None
    return None


def relocate(run_dir: Path) -> int:
    """Point every artifact file of ``run_dir``'s offline logs that is missing where it was staged at its copy
    under this folder's ``wandb/data``; the number of paths changed. A log that changes is kept beside it, as
    ``run-<id>.wandb.before-move`` (the first time)."""
    from wandb.proto import wandb_internal_pb2  # the record schema: W&B's own

    changed_total = 0
    for log in offline_logs(run_dir):
        wandb_dir = log.parent.parent
        raw = log.read_bytes()
        payloads, changed = [], 0
        for payload in read_payloads(raw):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "artifact":
                here = 0
                for entry in record.artifact.manifest.contents:
                    if entry.local_path and not os.path.exists(entry.local_path):
                        new = _moved(entry.local_path, wandb_dir)
                        if new is not None:
                            entry.local_path, here = new, here + 1
                if here:
                    payload, changed = record.SerializeToString(), changed + here
            payloads.append(payload)  # records left alone keep their bytes
        if changed:
            backup = log.with_name(log.name + ".before-move")
            if not backup.exists():
                shutil.copy2(log, backup)
            tmp = log.with_name(log.name + ".tmp")
            tmp.write_bytes(write_log(raw[:HEADER_LEN], payloads))
            os.replace(tmp, log)
            changed_total += changed
    return changed_total


def missing_files(run_dir: Path) -> list[str]:
    """The artifact files the run's offline logs name that are not on disk (what `wandb sync` would fail on)."""
    from wandb.proto import wandb_internal_pb2

    missing = []
    for log in offline_logs(run_dir):
        for payload in read_payloads(log.read_bytes()):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "artifact":
                missing += [e.local_path for e in record.artifact.manifest.contents
                            if e.local_path and not os.path.exists(e.local_path)]
    return missing


def sync_main(args: list[str]) -> int:
    """``python -m diffusion sync RUN_DIR [wandb sync options]``: a run folder, wherever it was moved, uploaded."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m diffusion sync",
        description="Upload a run folder's W&B offline run (all its starts, in order), also after the folder was "
                    "copied to another machine: artifact paths are pointed into the folder first. Options after "
                    "RUN_DIR go to `wandb sync` (e.g. --project, --entity, --dry-run).")
    parser.add_argument("run_dir", type=Path, help="runs/<config>/<run id>")
    ns, rest = parser.parse_known_args(args)
    logs = offline_logs(ns.run_dir)
    if not logs:
        print(f"error: no W&B offline run under {ns.run_dir} (runs/<config>/<run id>/wandb/offline-run-*); "
              "pass a run folder that `fit` or `test` wrote with W&B offline", file=sys.stderr)
        return 2
    moved = relocate(ns.run_dir)
    if moved:
        print(f"{moved} artifact file(s) pointed into {ns.run_dir} (the folder was moved)")
    missing = missing_files(ns.run_dir)
    if missing:
        print(f"warning: {len(missing)} artifact file(s) are missing, e.g. {missing[0]}: the run was staged outside "
              "its folder (WANDB_DATA_DIR was set); `wandb sync` uploads the rest", file=sys.stderr)
    command = [sys.executable, "-m", "wandb", "sync", *rest, *map(str, (log.parent for log in logs))]
    print(" ".join(command[2:]))
    return subprocess.call(command)
