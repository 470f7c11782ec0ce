"""Reading an offline Weights & Biases run back (its history), for the logging tests."""
import glob
import json


def wandb_history(run_folder) -> dict:
    """{step: {key: value}} of an offline W&B run's history records. The .wandb file is W&B's
    record log (LevelDB's log framing: a 7-byte file header, then 32 KiB blocks of records
    with a 7-byte header each: crc, length, type FULL / FIRST / MIDDLE / LAST); each record
    is a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    found = glob.glob(str(run_folder / "wandb" / "offline-run-*" / "run-*.wandb"))
    if not found:  # not written yet
        return {}
    (path,) = found
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    history, pos, pending = {}, 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # the block's zero-filled tail
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history

