"""Data-parallel stage training at a site: torch.distributed ranks, rank-sharded batches, averaged gradients.

A stage with `devices = N` (site.toml `[stage] devices = N`, `invcoss stage --nproc N`) runs its training loop on N
processes: one GPU each with NCCL, or N CPU processes with gloo. The stage started under `torchrun` (several nodes
of one site: `torchrun --nnodes M --nproc-per-node N -m invcoss_core.cli stage ...`) joins the group that torchrun
set up instead. Every rank builds the same seeded model, reads the same global batch order and masking noise from
the stage's generator and trains on its slice of each global batch; gradients are averaged over the ranks before
clipping and the optimizer step, so the update is the one-process update at the same global batch (up to floating-
point summation order). Rank 0 alone writes the epoch checkpoints, records the feature statistics (one pass over
the training data after the last epoch), runs the replay production (inversion, gate) and writes the artifact,
which is the one-process format.

Why not the `DistributedDataParallel` wrapper: a stage step runs several forward paths (the current modality through
`forward`, replay through `forward_encoder` for distillation, an EWC penalty) and leaves the tokenizers and heads of
the other modalities without gradients; DDP's reducer assumes one wrapped forward per backward and a fixed set of
used parameters. Averaging the gradients after `backward` is DDP's arithmetic without its overlap of communication
and computation.

Nothing crosses between processes by pickle: rank 0's result reaches the launching process as a file of raw bytes
(artifact files + a JSON summary), and torchrun ranks receive it by a byte-tensor broadcast.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
import signal
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ParamSpec

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, Sampler

from invcoss_core.common.events import EventSink, ProgressEvent, discard
from invcoss_core.training.outcome import StageError, StageResult

logger = logging.getLogger(__name__)

P = ParamSpec("P")
RESULT_FILE = "result.bin"
BUCKET_BYTES = 32 << 20  # gradients are averaged in flat buckets of this size (fewer, larger collectives)
GROUP_TIMEOUT_S = 4 * 3600  # a torchrun follower waits this long for rank 0's inversion and artifact
# The ranks of `launch_local` are forked, and a process forked after the CUDA driver was initialised cannot use CUDA.
# `torch.cuda.is_available()` initialises it unless this asks it to use NVML (as `device_count()` already does).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


class DistributedError(RuntimeError):
    """A multi-process stage cannot start or lost a rank; the message says what to change or that a rerun resumes."""


@dataclass(frozen=True)
class RankInfo:
    """Which process of a data-parallel stage this is."""

    rank: int  # 0 .. world_size-1 over all nodes; rank 0 writes checkpoints and the artifact
    world_size: int
    local_rank: int  # index on this node: the GPU it uses

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current: RankInfo | None = None


def current() -> RankInfo | None:
    """This process's rank while a data-parallel stage's process group is up, else None (one-process stage)."""
    return _current if _current is not None and dist.is_initialized() else None


def is_main(ranks: RankInfo | None) -> bool:
    """True for rank 0 and for a one-process stage."""
    return ranks is None or ranks.is_main


def world_size(ranks: RankInfo | None) -> int:
    """Processes sharing the stage's global batch (1 for a one-process stage)."""
    return 1 if ranks is None else ranks.world_size


def env_rank_info() -> RankInfo | None:
    """The rank a launcher (torchrun, or `launch_local`) gave this process via WORLD_SIZE/RANK/LOCAL_RANK, if > 1.

    Raises:
        DistributedError: for malformed launcher variables.
    """
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        size = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise DistributedError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if size <= 1:
        return None
    if not 0 <= rank < size:
        raise DistributedError(f"RANK {rank} is outside 0..{size - 1} (WORLD_SIZE {size})")
    return RankInfo(rank=rank, world_size=size, local_rank=local)


def rank_batches(sampler: Sampler[int], batch_size: int, ranks: RankInfo | None) -> Sampler[list[int]]:
    """Global batches of `batch_size` indices from `sampler`; on a rank, its contiguous slice of each.

    Args:
        sampler: the stage's epoch sampler (the same seeded order on every rank).
        batch_size: the global batch; must divide by the number of ranks.
    Raises:
        DistributedError: when the global batch does not divide by the ranks.
    """
    batches = BatchSampler(sampler, batch_size, drop_last=True)
    if ranks is None:
        return batches
    if batch_size % ranks.world_size:
        raise DistributedError(
            f"the global batch {batch_size} does not divide by {ranks.world_size} processes; "
            "set train.batch_size to a multiple of devices (or lower devices)"
        )
    return _RankSlices(batches, ranks)


class _RankSlices(Sampler[list[int]]):
    """Each global batch's slice for one rank (rank r: items r*b .. (r+1)*b-1, b = batch / world)."""

    def __init__(self, batches: BatchSampler, ranks: RankInfo) -> None:
        self.batches = batches
        self.per_rank = batches.batch_size // ranks.world_size
        self.start = ranks.rank * self.per_rank

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            yield batch[self.start : self.start + self.per_rank]

    def __len__(self) -> int:
        return len(self.batches)


def shard(tensor: torch.Tensor, ranks: RankInfo | None) -> torch.Tensor:
    """This rank's contiguous slice along dim 0 of a tensor drawn for the global batch, e.g. (B, L) masking noise."""
    if ranks is None:
        return tensor
    per_rank = tensor.shape[0] // ranks.world_size
    return tensor[ranks.rank * per_rank : (ranks.rank + 1) * per_rank]


def average_(tensor: torch.Tensor, ranks: RankInfo | None) -> torch.Tensor:
    """Replace `tensor` in place by its mean over the ranks (e.g. the loss sums read back for progress)."""
    if ranks is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(ranks.world_size)
    return tensor


def average_gradients(module: torch.nn.Module, ranks: RankInfo | None) -> None:
    """Average the parameter gradients over the ranks, in flat buckets (DDP's arithmetic, after backward).

    Every rank runs the same step (same modality, same replay batch from the shared generator), so the set of
    parameters with a gradient is the same on all of them.
    """
    if ranks is None:
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for grad in [*grads, None]:
        if grad is not None:
            bucket.append(grad)
            size += grad.numel() * grad.element_size()
        if bucket and (grad is None or size >= BUCKET_BYTES):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(ranks.world_size)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


@contextlib.contextmanager
def process_group(ranks: RankInfo, device: torch.device, store: dist.Store | None = None) -> Iterator[torch.device]:
    """Join the stage's process group (NCCL on CUDA, gloo on CPU) for the duration of the block.

    Args:
        store: the rendezvous (the local launcher's FileStore); None: torchrun's MASTER_ADDR/MASTER_PORT.
    Yields:
        the device this rank trains on (cuda:LOCAL_RANK on GPUs).
    Raises:
        DistributedError: when the rank's GPU does not exist.
    """
    global _current
    if device.type == "cuda":
        if ranks.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"local rank {ranks.local_rank} needs GPU {ranks.local_rank} but {torch.cuda.device_count()} are "
                "visible; lower [stage] devices (or --nproc) to the number of GPUs"
            )
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=GROUP_TIMEOUT_S)
    init = {"init_method": "env://"} if store is None else {"store": store}  # torchrun's variables, or ours
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size, timeout=timeout, **init)
    _current = ranks
    try:
        yield device
    finally:
        _current = None
        dist.destroy_process_group()


def data_parallel(stage_fn: Callable[P, StageResult | None]) -> Callable[P, StageResult]:
    """Run a stage function (keyword arguments `config`, `device`, `events`) on the ranks its config asks for.

    Under torchrun (WORLD_SIZE > 1) the process joins torchrun's group and every rank returns rank 0's result.
    With `config.devices > 1` and no launcher, `launch_local` starts the ranks on this node and returns rank 0's
    result. Otherwise the stage runs in this process, as before. Inside a rank, `stage_fn` returns None on the
    ranks other than 0. A DistributedError (bad layout, a lost rank) reaches the caller as StageError.
    """

    @functools.wraps(stage_fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> StageResult:
        options: dict[str, Any] = dict(kwargs)
        try:
            if current() is None:
                device = torch.device(options.get("device", "cpu"))
                ranks = env_rank_info()
                if ranks is not None:
                    return _run_rank(stage_fn, options, ranks, device)
                if options["config"].devices > 1:
                    return launch_local(stage_fn, options, options["config"].devices, device)
            result = stage_fn(*args, **kwargs)
        except DistributedError as err:
            raise StageError(str(err)) from None
        if result is None:
            raise StageError("the stage function returned no result outside a multi-process stage")
        return result

    return run


def _run_rank(
    stage_fn: Callable[..., StageResult | None],
    options: dict[str, Any],
    ranks: RankInfo,
    device: torch.device,
) -> StageResult:
    """One torchrun rank: train in the group, then receive rank 0's result (all ranks return the same)."""
    with process_group(ranks, device) as rank_device:
        options = {**options, "device": rank_device, **({} if ranks.is_main else {"events": discard})}
        result = stage_fn(**options)
        payload = result_to_bytes(result) if result is not None else b""
        data = _broadcast_bytes(payload, rank_device)
    return result if result is not None else result_from_bytes(data, options.get("out_dir"))


def _broadcast_bytes(payload: bytes, device: torch.device) -> bytes:
    """Rank 0's `payload` on every rank, as uint8 tensors (no pickle)."""
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    buffer = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
        if payload
        else torch.empty(int(length.item()), dtype=torch.uint8, device=device)
    )
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().numpy().tobytes())


def launch_local(
    stage_fn: Callable[..., StageResult | None],
    options: dict[str, Any],
    nproc: int,
    device: torch.device,
    poll_s: float = 0.2,
    stop_grace_s: float = 10.0,
) -> StageResult:
    """Run `stage_fn` on `nproc` forked ranks of this node (loopback only) and return rank 0's result.

    The ranks are forked, so they share the already loaded dataset, the incoming artifact and the signer without
    serialising them; their group meets in a FileStore in a private temporary folder and gloo talks over `lo`.
    Rank 0's progress events come back through a pipe as JSON and reach `options["events"]` in this process (the
    sink's threads, e.g. a progress display, stay here). When a rank dies (exit status, signal) the others are
    stopped and the stage fails; rerun it to resume from the last epoch checkpoint.

    Raises:
        DistributedError: for an impossible layout (more ranks than GPUs, CUDA already initialised, a batch that
            does not divide) or a rank that failed (naming the rank and how it ended).
    """
    config = options["config"]
    if config.train.batch_size % nproc:
        raise DistributedError(
            f"train.batch_size {config.train.batch_size} does not divide by devices = {nproc}; "
            "set it to a multiple of devices"
        )
    if device.type == "cuda":
        if torch.cuda.is_initialized():
            raise DistributedError("CUDA was initialised before the ranks were started; start the stage afresh")
        if nproc > torch.cuda.device_count():
            raise DistributedError(
                f"devices = {nproc} but {torch.cuda.device_count()} GPUs are visible; "
                "lower [stage] devices (or --nproc)"
            )
    ctx = multiprocessing.get_context("fork")
    events: EventSink = options.get("events", discard)
    reader, writer = ctx.Pipe(duplex=False)
    with tempfile.TemporaryDirectory(prefix="invcoss-ranks-") as tmp:
        folder = Path(tmp)
        procs = [
            ctx.Process(
                target=_local_rank_main, args=(stage_fn, options, rank, nproc, device, folder, writer), daemon=False
            )
            for rank in range(nproc)
        ]
        try:
            for proc in procs:
                proc.start()
            writer.close()  # the ranks hold their copies; this end is theirs
            logger.info("stage running on %d local processes (%s)", nproc, "nccl" if device.type == "cuda" else "gloo")
            failed = _wait_all(procs, poll_s, reader, events)
        finally:
            _stop(procs, stop_grace_s)
            reader.close()
        if failed:
            raise DistributedError(_failure_message(procs, folder, failed))
        return result_from_bytes((folder / RESULT_FILE).read_bytes(), options.get("out_dir"))


def _wait_all(procs: list[Any], poll_s: float, reader: Any, events: EventSink) -> list[int]:
    """Relay rank 0's events until every rank exited 0 (returns []) or one failed (returns the failed ranks)."""
    while True:
        while reader.poll():
            try:
                fields = json.loads(reader.recv_bytes())
            except EOFError:  # every rank closed its end
                break
            events(ProgressEvent(**fields))
        codes = [p.exitcode for p in procs]
        failed = [rank for rank, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            return failed
        if all(code == 0 for code in codes):
            return []
        time.sleep(poll_s)


def _stop(procs: list[Any], grace_s: float) -> None:
    """Stop the ranks still running: SIGTERM, then SIGKILL after `grace_s`."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=grace_s)


def _failure_message(procs: list[Any], folder: Path, failed: list[int]) -> str:
    parts = []
    for rank in failed:
        code = procs[rank].exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        error_file = folder / f"error-{rank}.json"
        if error_file.is_file():
            error = json.loads(error_file.read_text())
            how += f" ({error['type']}: {error['message']})"
        parts.append(f"rank {rank} {how}")
    return (
        f"the stage lost a process of {len(procs)}: {'; '.join(parts)}. The other ranks were stopped; rerun the "
        "stage to resume from its last epoch checkpoint"
    )


def _local_rank_main(
    stage_fn: Callable[..., StageResult | None],
    options: dict[str, Any],
    rank: int,
    nproc: int,
    device: torch.device,
    folder: Path,
    events: Any,
) -> None:
    """Body of one forked rank: join the group, train, rank 0 writes its result for the launcher; never returns."""
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with the launcher instead of training on
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    # Inherited handlers may belong to a display whose lock another thread of the launcher held at the fork.
    logging.root.handlers = [logging.StreamHandler()]
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: the ranks talk over loopback only
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    torch.set_num_threads(max(1, torch.get_num_threads() // nproc))  # share the cores instead of oversubscribing
    ranks = RankInfo(rank=rank, world_size=nproc, local_rank=rank)
    code = 0
    try:
        store = dist.FileStore(str(folder / "store"), nproc)
        with process_group(ranks, device, store) as rank_device:
            sink = _pipe_sink(events) if ranks.is_main else discard
            result = stage_fn(**{**options, "device": rank_device, "events": sink})
        if result is not None:
            tmp = folder / f".{RESULT_FILE}"
            tmp.write_bytes(result_to_bytes(result))
            tmp.rename(folder / RESULT_FILE)
    except BaseException as err:  # reported to the launcher, which raises it as the stage's failure
        (folder / f"error-{rank}.json").write_text(json.dumps({"type": type(err).__name__, "message": str(err)}))
        logger.error("rank %d failed: %s", rank, err)
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)  # skip the atexit handlers inherited from the launching process


def _pipe_sink(connection: Any) -> EventSink:
    """An event sink that sends each event as JSON to the launcher's end of a pipe."""

    def send(event: ProgressEvent) -> None:
        connection.send_bytes(json.dumps(dataclasses.asdict(event)).encode())

    return send


def result_to_bytes(result: StageResult) -> bytes:
    """A StageResult as bytes: an 8-byte header length, a JSON header, then the artifact files and previews."""
    blobs: list[tuple[str, str, bytes]] = [("files", k, v) for k, v in result.files.items()]
    blobs += [("previews", k, v) for k, v in result.previews.items()]
    header = {
        "blobs": [[kind, name, len(data)] for kind, name, data in blobs],
        "epoch_losses": result.epoch_losses,
        "replay_losses": result.replay_losses,
        "train_seconds": result.train_seconds,
        "replay_seconds": result.replay_seconds,
        "images_per_second": result.images_per_second,
        "resumed_from_epoch": result.resumed_from_epoch,
        "metrics": result.metrics,
    }
    head = json.dumps(header).encode()
    return b"".join([struct.pack(">Q", len(head)), head, *(data for _, _, data in blobs)])


def result_from_bytes(data: bytes, out_dir: Path | str | None) -> StageResult:
    """The StageResult that `result_to_bytes` wrote (the artifact decoded again from its files)."""
    from invcoss_core.artifact import decode_artifact

    (length,) = struct.unpack(">Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    offset = 8 + length
    parts: dict[str, dict[str, bytes]] = {"files": {}, "previews": {}}
    for kind, name, size in header["blobs"]:
        parts[kind][name] = data[offset : offset + size]
        offset += size
    return StageResult(
        files=parts["files"],
        artifact=decode_artifact(parts["files"], source="the stage's rank 0"),
        out_dir=Path(out_dir) if out_dir is not None else None,
        epoch_losses=[float(x) for x in header["epoch_losses"]],
        replay_losses=[float(x) for x in header["replay_losses"]],
        train_seconds=float(header["train_seconds"]),
        replay_seconds=float(header["replay_seconds"]),
        images_per_second=float(header["images_per_second"]),
        resumed_from_epoch=int(header["resumed_from_epoch"]),
        metrics={k: float(v) for k, v in header["metrics"].items()},
        previews=parts["previews"],
    )


__all__ = [
    "DistributedError",
    "RankInfo",
    "average_",
    "average_gradients",
    "current",
    "data_parallel",
    "env_rank_info",
    "is_main",
    "launch_local",
    "process_group",
    "rank_batches",
    "result_from_bytes",
    "result_to_bytes",
    "shard",
    "world_size",
]
