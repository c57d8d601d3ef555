"""Data-parallel training over ``torch.distributed``: one job, N processes, one quantum job
per angle update.

Every rank holds the whole (frozen) base model and the adapter, takes an equal slice of
each step's global batch (``train.batch_size`` examples, as in a single-process run) and
the gradients are summed across ranks before the optimizer steps. Each rank's loss is its
tokens' loss sum divided by the *global* token count, so the summed gradient is exactly
the single-process gradient of the same global batch: learning rate, schedule, clipping
and checkpoints mean what they mean in one process, and a checkpoint written by N
processes resumes with any other number.

The quantum side is not replicated: rank 0 alone runs the circuit (``SharedBackend`` in
``qpa.backends.shared``) and broadcasts p, so a window costs one primitive job whatever
the world size; dL/dp is summed across ranks like any gradient, before it is pulled back
into the angles.

Two ways to start N processes, both on the env:// conventions of ``torchrun``
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):

* ``LocalGroup(n)`` (``qpa finetune --nproc N``, the worker's ``QPA_WORKER_NPROC``):
  the calling process is rank 0 and starts N-1 helper processes (``python -m
  qpa.distributed``) that receive each job from it. The caller keeps its progress
  callbacks, cancel checks and lease heartbeat, which is what the service needs.
* ``torchrun --nproc-per-node N -m qpa.cli finetune CONFIG``: every rank is started by
  torchrun and reads the config itself (``from_torchrun_env``); multi-node works the
  same way.

Backends: NCCL with one GPU per rank when CUDA is used, gloo on CPU.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist

from qpa.errors import ConfigError, JobCancelled, QuantumBudgetExceeded

if TYPE_CHECKING:
    from qpa.backends.base import QuantumBackend
    from qpa.config import JobConfig, QuantumOptions
    from qpa.methods.base import AdapterMethod
    from qpa.training import Trainer

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a collective may wait. Rank 0 may sit in a QPU queue for hours while the other
#: ranks wait for p, so this is long; a rank that dies is noticed at once on gloo (its
#: sockets close) and by NCCL's async error handling on GPUs, not by this timeout.
COLLECTIVE_TIMEOUT = timedelta(hours=12)
#: How long helper processes may take to start and join (imports on a loaded machine).
JOIN_TIMEOUT_S = 600.0
#: Errors every rank raises at the same point of a job (a rejected config, a cancel decided
#: by rank 0, the quantum budget read from rank 0's mirrored usage): after one of these
#: the group is still in step and can run the next job.
IN_STEP_ERRORS = (ConfigError, JobCancelled, QuantumBudgetExceeded)


def _comm_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel job, and the few collectives training uses.

    With ``world_size == 1`` (``SINGLE_PROCESS``) every method is the plain single-process
    operation and touches no process group.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def comm_device(self) -> torch.device:
        """Where tensors must be for a collective: the GPU for NCCL, the CPU for gloo."""
        return self.device if _comm_backend(self.device) == "nccl" else torch.device("cpu")

    # -- agreement -------------------------------------------------------------------------
    def from_main(self, produce: Callable[[], T]) -> T:
        """Rank 0 runs ``produce``; every rank returns its result (or raises its error).

        For small objects and CPU tensors or arrays (pickled): checkpoints, quantum results.
        """
        if not self.active:
            return produce()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", produce())
            except Exception as error:  # re-raised below, on every rank alike
                box[0] = ("error", _picklable(error))
        dist.broadcast_object_list(box, src=0, device=self.comm_device)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def decide(self, ask: Callable[[], bool]) -> bool:
        """Rank 0's answer to ``ask`` (e.g. "was the job cancelled?") on every rank."""
        if not self.active:
            return bool(ask())
        flag = torch.tensor([1 if self.is_main and ask() else 0], device=self.comm_device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def all_agree(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (a MIN all-reduce)."""
        if not self.active:
            return ok
        flag = torch.tensor([1 if ok else 0], device=self.comm_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block before the others (e.g. a one-off model conversion)."""
        if not self.active:
            yield
            return
        if not self.is_main:
            dist.barrier()
        try:
            yield
        finally:
            if self.is_main:
                dist.barrier()

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks, in float64."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    # -- tensors -------------------------------------------------------------------------
    def broadcast_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's values (one flat broadcast per dtype)."""
        if not self.active:
            return
        for group in _by_dtype(list(tensors)):
            flat = torch.cat([t.detach().reshape(-1).to(self.comm_device) for t in group])
            dist.broadcast(flat, src=0)
            _scatter_back(flat, group)

    def backward(self, loss: torch.Tensor, method: AdapterMethod) -> float:
        """``loss.backward()``, then sum the step's gradients and losses over the ranks;
        returns the global batch's loss.

        The trainable parameters' ``.grad`` holds this step's gradient only (the optimizer
        zeroes it). ``method.gradient_leaves()`` (QPA's held p) collect gradient over
        several steps: what they hold from earlier steps, already summed, is set aside
        during backward so that only this step's part is summed, then added back.
        """
        if not self.active:
            loss.backward()
            return float(loss.item())
        leaves = method.gradient_leaves()
        earlier = [leaf.grad for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        loss.backward()
        grads = [p.grad for p in method.trainable_parameters() if p.grad is not None]
        grads += [leaf.grad for leaf in leaves if leaf.grad is not None]
        loss_slot = loss.detach().reshape(1).to(torch.float64)
        for group in _by_dtype([*grads, loss_slot]):
            flat = torch.cat([g.reshape(-1).to(self.comm_device) for g in group])
            dist.all_reduce(flat)
            _scatter_back(flat, group)
        for leaf, before in zip(leaves, earlier, strict=True):
            if before is not None:
                leaf.grad = before if leaf.grad is None else before + leaf.grad
        return float(loss_slot.item())

    # -- quantum ---------------------------------------------------------------------------
    def quantum_backend(self, spec: str, circuit: Any, options: QuantumOptions,
                        device: str = "cpu") -> QuantumBackend:
        """The backend a method should use: rank 0 runs ``spec``, the other ranks receive.

        Single-process this is ``make_backend``; otherwise only rank 0 builds the real
        backend (opens the Runtime session, transpiles), so no other rank ever submits a job.
        """
        from qpa.backends.factory import make_backend

        if not self.active:
            return make_backend(spec, circuit, options, device=device)
        from qpa.backends.shared import SharedBackend

        inner = make_backend(spec, circuit, options, device=device) if self.is_main else None
        return SharedBackend(circuit, spec, inner, self)


SINGLE_PROCESS = DataParallel()


def _by_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault(tensor.dtype, []).append(tensor)
    return list(groups.values())


def _scatter_back(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            count = tensor.numel()
            tensor.copy_(flat[offset:offset + count].view_as(tensor))
            offset += count


def _picklable(error: BaseException) -> BaseException:
    """The error itself when it survives pickling (so every rank raises its type), else a
    RuntimeError carrying its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"on rank 0: {type(error).__name__}: {error}")


# -- checks ----------------------------------------------------------------------------------


def check_nproc(nproc: int) -> None:
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError("nproc", f"must be a whole number of processes >= 1, got {nproc!r}")


def resolve_device_kind(requested: str, nproc: int) -> str:
    """``cuda`` or ``cpu`` for a job of ``nproc`` processes with ``train.device``."""
    wants_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if not wants_cuda:
        return "cpu"
    available = torch.cuda.device_count()
    if available < nproc:
        field_name = "train.device" if available == 0 else "nproc"
        raise ConfigError(
            field_name,
            f"{nproc} processes need {nproc} GPUs (one per process) but {available} "
            "are visible; use fewer processes or train.device: cpu",
        )
    return "cuda"


def check_world(config: JobConfig, world_size: int) -> None:
    """The job constraints data parallelism adds, as ConfigErrors naming the field."""
    if config.train.batch_size % world_size:
        raise ConfigError(
            "train.batch_size",
            f"{config.train.batch_size} is not divisible by the {world_size} processes: the "
            "global batch is split evenly across them (use a multiple of the process count)",
        )


def device_for_rank(kind: str, local_rank: int) -> torch.device:
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# -- torchrun -------------------------------------------------------------------------------


def torchrun_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when this process was not started by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def from_torchrun_env(device_request: str = "auto") -> DataParallel:
    """Join the process group torchrun set up (env://) and return this rank's place."""
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    kind = resolve_device_kind(device_request, local_world)
    device = device_for_rank(kind, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(
            _comm_backend(device), init_method="env://", rank=rank, world_size=world_size,
            timeout=COLLECTIVE_TIMEOUT, device_id=device if kind == "cuda" else None,
        )
    return DataParallel(rank=rank, world_size=world_size, device=device)


# -- this process as rank 0 of N on this machine ------------------------------------------


class LocalGroup:
    """N processes on this machine: the caller is rank 0, N-1 helpers join it.

    ``with LocalGroup(2) as group: group.finetune(config, out)`` trains one job across
    the group; several jobs may run one after another. The rendezvous is a TCPStore that
    rank 0 opens on a port the OS picks (port 0), so parallel groups never collide.
    """

    def __init__(self, nproc: int, device: str = "auto", *, trainer: type[Trainer]):
        check_nproc(nproc)
        # The trainer is passed in, not imported: qpa.training imports this module.
        self.trainer = trainer
        self.nproc = nproc
        self.kind = resolve_device_kind(device, nproc)
        self.helpers: list[subprocess.Popen] = []
        self.data_parallel: DataParallel | None = None
        self._store: dist.TCPStore | None = None
        self._broken = False
        self._threads: int | None = None

    def __enter__(self) -> LocalGroup:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @property
    def world_size(self) -> int:
        return self.nproc

    def start(self) -> None:
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group")
        threads = max(1, (os.cpu_count() or 1) // self.nproc)
        if self.kind == "cpu":
            # N ranks on one CPU: give each its share of the cores, as torchrun does.
            self._threads = torch.get_num_threads()
            torch.set_num_threads(threads)
        self._store = dist.TCPStore("127.0.0.1", 0, world_size=self.nproc, is_master=True,
                                    wait_for_workers=False, timeout=COLLECTIVE_TIMEOUT)
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self._store.port),
               "WORLD_SIZE": str(self.nproc), "LOCAL_WORLD_SIZE": str(self.nproc),
               "QPA_DP_DEVICE": self.kind, "QPA_DP_PARENT": str(os.getpid()),
               "OMP_NUM_THREADS": str(threads)}
        try:
            for rank in range(1, self.nproc):
                self.helpers.append(subprocess.Popen(
                    [sys.executable, "-m", "qpa.helper_rank"],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                ))
            self._wait_for_helpers()
            device = device_for_rank(self.kind, 0)
            dist.init_process_group(
                _comm_backend(device), store=self._store, rank=0, world_size=self.nproc,
                timeout=COLLECTIVE_TIMEOUT, device_id=device if self.kind == "cuda" else None,
            )
            self.data_parallel = DataParallel(rank=0, world_size=self.nproc, device=device)
        except BaseException:
            self._broken = True
            self.close()
            raise

    def _wait_for_helpers(self) -> None:
        keys = [f"qpa/joined/{rank}" for rank in range(1, self.nproc)]
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not self._store.check(keys):
            for rank, helper in enumerate(self.helpers, start=1):
                code = helper.poll()
                if code is not None:
                    raise RuntimeError(
                        f"data-parallel rank {rank} exited with code {code} before joining "
                        "(its error is above, on stderr)"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"data-parallel helpers did not join within {JOIN_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.1)

    def finetune(self, config: JobConfig, output_dir: str | Path, *,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 resume: bool = True) -> dict[str, Any]:
        """Run one job across the group (this process is rank 0); returns its metrics."""
        if self.data_parallel is None or self._broken:
            raise RuntimeError("the process group is not running")
        check_world(config, self.nproc)
        job = {"config": config.model_dump(mode="json"), "output_dir": str(output_dir),
               "resume": resume}
        dist.broadcast_object_list([job], src=0, device=self.data_parallel.comm_device)
        trainer = self.trainer(config, output_dir, on_event=on_event, should_stop=should_stop,
                               data_parallel=self.data_parallel)
        try:
            return trainer.run(resume)
        except IN_STEP_ERRORS:
            raise  # every rank raised it at the same point: the group is still in step
        except BaseException:
            self._broken = True  # the other ranks may be anywhere: do not reuse the group
            raise

    def close(self) -> None:
        """Stop the helpers (asking them to exit when the group is in step) and leave."""
        try:
            if self.data_parallel is not None and not self._broken:
                dist.broadcast_object_list([None], src=0,
                                           device=self.data_parallel.comm_device)
                for helper in self.helpers:
                    helper.wait(timeout=60)
        except Exception:
            log.exception("data-parallel helpers did not stop cleanly")
        finally:
            for helper in self.helpers:
                _stop_process(helper)
            failed = {rank: helper.returncode
                      for rank, helper in enumerate(self.helpers, start=1) if helper.returncode}
            if failed and not self._broken:
                log.warning("data-parallel helpers exited with codes %s", failed)
            self.helpers = []
            if dist.is_initialized():
                dist.destroy_process_group()
            self.data_parallel = None
            self._store = None
            if self._threads is not None:
                torch.set_num_threads(self._threads)
                self._threads = None


def _stop_process(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def launch(config: JobConfig, output_dir: str | Path, nproc: int, *, trainer: type[Trainer],
           on_event: Callable[[dict[str, Any]], None] | None = None,
           should_stop: Callable[[], bool] | None = None,
           resume: bool = True) -> dict[str, Any]:
    """Run one job with ``nproc`` processes on this machine; this process is rank 0."""
    check_nproc(nproc)
    check_world(config, nproc)  # before any process starts
    with LocalGroup(nproc, config.train.device, trainer=trainer) as group:
        return group.finetune(config, output_dir, on_event=on_event, should_stop=should_stop,
                              resume=resume)


# -- helper ranks (python -m qpa.helper_rank) -------------------------------------------


def _exit_with_parent(parent: int) -> None:
    """A helper outlives nothing: when rank 0's process is gone, exit (no orphans)."""
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(1.0)


def _quiet_helper() -> None:
    """Rank 0 reports progress and warnings; a helper's copies would only interleave."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def helper_main(trainer_class: type[Trainer]) -> int:
    """Rank r > 0 of a ``LocalGroup``: join, then train every job rank 0 sends."""
    from qpa.config import parse_config

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    threading.Thread(target=_exit_with_parent, args=(int(os.environ["QPA_DP_PARENT"]),),
                     daemon=True).start()
    _quiet_helper()
    kind = os.environ.get("QPA_DP_DEVICE", "cpu")
    if kind == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          world_size=world_size, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    device = device_for_rank(kind, int(os.environ.get("LOCAL_RANK", rank)))
    store.set(f"qpa/joined/{rank}", "1")
    dist.init_process_group(_comm_backend(device), store=store, rank=rank,
                            world_size=world_size, timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if kind == "cuda" else None)
    data_parallel = DataParallel(rank=rank, world_size=world_size, device=device)
    comm = data_parallel.comm_device
    try:
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, device=comm)
            job = box[0]
            if job is None:
                return 0
            trainer = trainer_class(parse_config(job["config"]), job["output_dir"],
                                    data_parallel=data_parallel)
            try:
                trainer.run(job["resume"])
            except IN_STEP_ERRORS:
                continue  # rank 0 raised the same and reports it; wait for its next job
    finally:
        dist.destroy_process_group()
