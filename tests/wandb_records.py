"""Read an offline W&B run file (run-*.wandb) back, with wandb's own protobuf definitions.

wandb 0.31 ships no Python reader for these files. The format is a 7-byte header (':W&B', magic, version)
followed by LevelDB-style log blocks of 32 KiB, each record framed as crc32 (4 bytes), length (2), type (1:
full, 2: first, 3: middle, 4: last), and its payload a serialized wandb Record message.
"""

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7


def payloads(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding to the end of the block
            pos += left_in_block
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk


def history(path: Path) -> dict[int, dict]:
    """{step: {metric: value}} from the run's history records."""
    out: dict[int, dict] = {}
    for payload in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        # torchtune's WandBLogger records the training step as "global_step" (W&B's own _step counts log calls).
        step = int(row.get("global_step", row.get("_step", record.history.step.num)))
        out.setdefault(step, {}).update(row)
    return out


def run_id(path: Path) -> str | None:
    """The W&B run id the file's run record names."""
    for payload in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "run":
            return record.run.run_id
    return None


def summary(path: Path) -> dict:
    """The run's summary as its summary records leave it (later updates win)."""
    out: dict = {}
    for payload in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                out[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
