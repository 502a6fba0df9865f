"""Artifact parts on the site's disk: the `train.part` slices that travel ahead of a big stage message.

Each transfer (one coordinator send of one artifact) has a folder `<incoming>/<transfer id>/` holding its parted
files as they arrive, slice by slice; the stage message that names the transfer reads them back whole. Nothing
here verifies an artifact: the assembled files go through `decode_artifact` like inline ones.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from invcoss_core.common.protocol import PartRequest, ProtocolError, check_parted_file, check_transfer

__all__ = ["discard_other_transfers", "read_transfer", "store_part"]


def store_part(incoming: Path, part: PartRequest) -> Path:
    """Write one slice into its transfer folder (creating the file at its full size on first sight).

    Returns:
        The partly written file.
    Raises:
        ProtocolError: for an unsafe transfer id or file name, or a file already started at another size.
    """
    check_transfer(part.transfer)
    check_parted_file(part.file, part.size)
    folder = incoming / part.transfer
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / part.file
    if path.exists() and path.stat().st_size != part.size:
        raise ProtocolError(f"part of {part.file} says {part.size} bytes; the transfer's file has another size")
    with open(path, "r+b" if path.exists() else "w+b") as fh:
        fh.truncate(part.size)
        fh.seek(part.offset)
        fh.write(part.data)
        fh.flush()
        os.fsync(fh.fileno())
    (folder / f".{part.file}.{part.offset}-{len(part.data)}").touch()  # this slice is on disk
    return path


def _covered(folder: Path, name: str, size: int) -> bool:
    """True when the stored slices of `name` cover bytes 0..size without a gap."""
    spans: list[tuple[int, int]] = []
    for marker in folder.glob(f".{name}.*-*"):
        first, _, count = marker.name[len(name) + 2 :].partition("-")
        if first.isdigit() and count.isdigit():
            spans.append((int(first), int(count)))
    end = 0
    for start, length in sorted(spans):
        if start > end:
            return False
        end = max(end, start + length)
    return end >= size


def read_transfer(incoming: Path, transfer: str, parted: dict[str, int]) -> dict[str, bytes]:
    """The parted files of a transfer, read back whole; the folder is removed once they are in memory.

    Raises:
        ProtocolError: when a file is missing or of another size than the stage message says (a part was lost:
            the coordinator's retry resends the artifact).
    """
    check_transfer(transfer)
    folder = incoming / transfer
    files: dict[str, bytes] = {}
    for name, size in sorted(parted.items()):
        check_parted_file(name, size)
        path = folder / name
        if not path.is_file() or path.stat().st_size != size or not _covered(folder, name, size):
            raise ProtocolError(f"artifact file {name} of transfer {transfer} did not arrive whole (parts missing)")
        files[name] = path.read_bytes()
    shutil.rmtree(folder, ignore_errors=True)
    return files


def discard_other_transfers(incoming: Path, keep: str) -> None:
    """Remove the folders of earlier, abandoned transfers (a site takes one message at a time, in order)."""
    if not incoming.is_dir():
        return
    for entry in incoming.iterdir():
        if entry.is_dir() and entry.name != keep:
            shutil.rmtree(entry, ignore_errors=True)
