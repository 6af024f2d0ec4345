"""Bad files met by the loader during training, after the start-up scan passed them.

The scan cannot catch everything: `data.verify: header` or `off` leave truncated bodies to the loader,
and a file may change after the scan. A `FileImageDataset` given a `LoaderBadImages` does not raise on
such a file: it records it here and serves the next file of its split that decodes instead (see
`FileImageDataset.replacement`), so the batch keeps its size and the run its determinism. The record is
an append-only file, because the dataset may run in loader worker processes, which share no memory with
the main one: each record is one `write` of one line on a file opened with O_APPEND, whole lines that do
not interleave. The main process reads the new lines (`new_records`) before each step and after each
evaluation and applies `data.on_bad_image`: `error` stops the run before the batch is used, `skip` lists
the file and goes on (the training side lives in api.py, which owns the run folder).
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from pathlib import Path
from typing import Any


def _remove(file: str) -> None:
    Path(file).unlink(missing_ok=True)


class LoaderBadImages:
    """An append-only record of (path, reason) shared by the main process and its loader workers."""

    def __init__(self, file: str | Path):
        self.file = str(file)
        self.offset = 0   # bytes of the file the main process has read (new_records)

    @classmethod
    def create(cls) -> LoaderBadImages:
        """A new, empty record in the system's temporary folder (`close` removes it)."""
        handle, name = tempfile.mkstemp(prefix="imgtrain-bad-images-", suffix=".jsonl")
        os.close(handle)
        record = cls(name)
        # removed when the record is garbage-collected or the process exits, however the run ended
        weakref.finalize(record, _remove, name)
        return record

    def record(self, path: str, reason: str) -> None:
        """Add one bad file (from any process)."""
        line = (json.dumps([str(path), str(reason)]) + "\n").encode("utf-8")
        fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def new_records(self) -> list[tuple[str, str]]:
        """The records added since the last call (main process), in the order they were written."""
        try:
            with open(self.file, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read next time
        self.offset += len(complete)
        records = []
        for line in complete.decode("utf-8").splitlines():
            path, reason = json.loads(line)
            records.append((str(path), str(reason)))
        return records

    def close(self) -> None:
        Path(self.file).unlink(missing_ok=True)

    def __getstate__(self) -> dict[str, Any]:
        return {"file": self.file, "offset": 0}  # a worker only appends


def watch_loader_files(splits: Any) -> LoaderBadImages | None:
    """Give every file-reading split (train, val, test) one new record; None when no split reads files.

    Call it before the loaders' workers start: they take a copy of the datasets when they do."""
    readers = [d for d in (splits.train, splits.val, splits.test) if d is not None and hasattr(d, "bad_images")]
    if not readers:
        return None
    record = LoaderBadImages.create()
    for dataset in readers:
        dataset.bad_images = record
    return record


__all__ = ["LoaderBadImages", "watch_loader_files"]
