"""Distributed set-up: resolve the launcher's environment once and return one frozen record.

Order: torchrun / torch.distributed.launch --use_env (RANK, WORLD_SIZE, LOCAL_RANK), then SLURM
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), then OpenMPI with --dist_on_itp, else one process with
no process group. The backend follows the device: nccl on CUDA, gloo on CPU.
"""
import dataclasses
import datetime
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from util.args import HEARTBEAT_INTERVAL_S
from util.cuda_env import arch_problem, cuda_diagnosis, gpu_signs
from util.errors import SetupError

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    source: str = "single"  # torchrun | slurm | openmpi | single
    master_addr: str = ""
    master_port: int = 0
    forced: bool = False  # --force_process_group: a process group even at world size 1

    @property
    def distributed(self) -> bool:
        """There is a process group (and a DDP-wrapped model)."""
        return self.world_size > 1 or self.forced

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as 'gpu[01-03,07],cpu5' into host names, in order."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
    return hosts


def _int_env(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError as e:
        raise SetupError(f"environment variable {name}={env[name]!r} is not an integer") from e


def resolve_env(env=None, dist_on_itp: bool = False) -> DistInfo:
    """Work out rank, world size and rendezvous from environment variables alone (no side effects)."""
    env = os.environ if env is None else env
    torchrun_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    present = [v for v in torchrun_vars if v in env]
    if present:
        missing = [v for v in torchrun_vars if v not in env]
        if missing:
            raise SetupError(
                f"the launcher environment is only partly set: {', '.join(present)} present but "
                f"{', '.join(missing)} missing. Launch with torchrun, or unset the partial variables."
            )
        return DistInfo(
            rank=_int_env(env, "RANK"),
            world_size=_int_env(env, "WORLD_SIZE"),
            local_rank=_int_env(env, "LOCAL_RANK"),
            source="torchrun",
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job_id = int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0)
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        return DistInfo(
            rank=_int_env(env, "SLURM_PROCID"),
            world_size=_int_env(env, "SLURM_NTASKS"),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            source="slurm",
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            # A port derived from the job id lets two jobs share a node without colliding.
            master_port=int(env.get("MASTER_PORT") or 15000 + job_id % 20000),
        )
    if dist_on_itp and "OMPI_COMM_WORLD_RANK" in env:
        return DistInfo(
            rank=_int_env(env, "OMPI_COMM_WORLD_RANK"),
            world_size=_int_env(env, "OMPI_COMM_WORLD_SIZE"),
            local_rank=_int_env(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
            source="openmpi",
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
        )
    return DistInfo()


def ranks_on_this_node(info: DistInfo, env=None) -> int:
    """How many ranks share this node (and its /dev/shm): torchrun's LOCAL_WORLD_SIZE, SLURM's tasks on this node
    (SLURM_NTASKS_PER_NODE, or SLURM_TASKS_PER_NODE such as '8(x2)'), else every rank when there is one node."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        match = re.match(r"\d+", env.get(name, ""))
        if match and info.distributed:
            return int(match.group())
    return info.world_size if info.distributed else 1


def cuda_index(local_rank: int, visible: int) -> int:
    """This rank's GPU: its local rank. More ranks on a node than visible GPUs would put two ranks on one GPU (NCCL
    then fails with 'Duplicate GPU'): an error naming both numbers."""
    if local_rank >= visible:
        raise SetupError(f"local rank {local_rank} has no GPU of its own: {visible} GPU(s) are visible on this node "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Start at most "
                         f"{visible} process(es) per node (--nproc_per_node {visible}), or make every GPU visible.")
    return local_rank


def resolve_device(requested: str | None, local_rank: int) -> torch.device:
    """None picks CUDA when present, else CPU. An explicit 'cuda' without CUDA is an error, not a fallback."""
    if requested is None:
        # a GPU nvidia-smi lists and torch cannot use: never a silent fall-back to the CPU
        if not torch.cuda.is_available() and (signs := gpu_signs(visible_devices=False)):
            raise SetupError(f"this machine has a GPU ({'; '.join(signs)}) but torch sees no CUDA. {cuda_diagnosis()} "
                             "Pass --device cpu to train on the CPU anyway.")
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SetupError("--device cuda was requested but CUDA is not available here; pass --device cpu. "
                             + cuda_diagnosis())
        if device.index is None:
            device = torch.device("cuda", cuda_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        problem = arch_problem(torch.cuda.get_device_capability(device), torch.cuda.get_arch_list(),
                               torch.cuda.get_device_name(device))
        if problem:
            raise SetupError(problem)
    return device


def init_distributed(args) -> tuple[DistInfo, torch.device]:
    """Resolve the environment, pick the device, and join the process group when there is one."""
    info = resolve_env(dist_on_itp=getattr(args, "dist_on_itp", False))
    for flag, given, actual in (("--world_size", args.world_size, info.world_size),
                                ("--local_rank", args.local_rank, info.local_rank)):
        if given not in (actual, {"--world_size": 1, "--local_rank": -1}[flag]):
            logger.warning("%s %d ignored: the launcher's environment says %d", flag, given, actual)
    device = resolve_device(args.device, info.local_rank)
    if args.force_process_group:
        info = dataclasses.replace(info, forced=True, master_addr=info.master_addr or "127.0.0.1",
                                   master_port=info.master_port or DEFAULT_MASTER_PORT)
    if info.distributed:
        os.environ.setdefault("MASTER_ADDR", info.master_addr)
        os.environ.setdefault("MASTER_PORT", str(info.master_port))
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=args.dist_timeout)
        store, _, _ = next(dist.rendezvous(args.dist_url, info.rank, info.world_size, timeout=timeout))
        # on the agents' store, which outlives a restart, a per-attempt prefix keeps restarted ranks from reading the
        # dead ranks' gloo/NCCL addresses; a fresh store per round holds nothing stale (see elastic_restart_problem)
        if on_agent_store():
            store = dist.PrefixStore(f"medmae/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend=backend, store=store, world_size=info.world_size, rank=info.rank,
                                timeout=timeout)
    return info, device


class Heartbeat:
    """Liveness counters in a small TCPStore hosted by rank 0, bumped every second by a daemon thread per rank.

    The same thread watches the next rank's counter (rank r watches r + 1, so the store sees 3 requests per rank per
    second at any world size). A counter that has not moved for --heartbeat_timeout seconds means that process died,
    was killed or is stopped (SIGSTOP): the watcher posts a verdict in the store, every rank's thread reads it within
    a second, logs it and ends its process. This does not depend on the backend: with NCCL a collective blocked on a
    dead peer raises nothing in Python until the NCCL watchdog aborts it after --dist_timeout. A rank that is alive
    but slow (a long checkpoint write, a stuck filesystem) keeps beating and is left to --dist_timeout.

    When a collective fails (gloo raises at once on a closed socket), report() reads every counter twice, a few
    seconds apart, to name the dead ranks. No clocks are compared, so skew between nodes does not matter.
    """

    current: "Heartbeat | None" = None
    interval_s = HEARTBEAT_INTERVAL_S
    # a checkpoint being written finishes before a watcher ends the process (save() holds this lock meanwhile)
    writing = threading.Lock()

    def __init__(self, info: DistInfo, timeout_s: int, dead_after_s: float, exit_code: int):
        self.info = info
        self.dead_after_s = dead_after_s
        self._exit_code = exit_code
        self._timeout = datetime.timedelta(seconds=min(timeout_s, 30))
        self._host = os.environ.get("MASTER_ADDR", info.master_addr)
        port = [0]
        if info.is_main:
            self._server = dist.TCPStore(self._host, 0, info.world_size, True, self._timeout, wait_for_workers=False)
            port = [self._server.port]
        dist.broadcast_object_list(port, src=0)
        self._port = port[0]
        self.store = self._client()
        self._stop = threading.Event()
        threading.Thread(target=self._beat_and_watch, name="heartbeat", daemon=True).start()
        Heartbeat.current = self

    def _client(self):
        return dist.TCPStore(self._host, self._port, self.info.world_size, False, self._timeout)

    def _beat_and_watch(self) -> None:
        store = self._client()  # its own connection: TCPStore clients are not shared across threads
        rank, watched = self.info.rank, (self.info.rank + 1) % self.info.world_size
        last_count, last_change, unreachable_since = -1, time.monotonic(), None
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                store.add(f"alive/{rank}", 1)
                count = store.add(f"alive/{watched}", 0)
                finished = store.check([f"done/{watched}"])
                verdict = store.get("dead").decode() if store.check(["dead"]) else None
            except (RuntimeError, dist.DistError):
                # rank 0 exits last on a clean finish, so a store gone for this long means rank 0 died
                unreachable_since = unreachable_since or now
                if now - unreachable_since >= self.dead_after_s and not self._stop.is_set():
                    self._abort(f"rank 0 has been unreachable for {now - unreachable_since:.0f} s (it hosts the "
                                "heartbeat store): it died or was killed")
                continue
            unreachable_since = None
            if verdict and not self._stop.is_set():
                self._abort(verdict)
            if count != last_count:
                last_count, last_change = count, now
            elif not finished and now - last_change >= self.dead_after_s and not self._stop.is_set():
                verdict = (f"rank {watched} sent no heartbeat for {now - last_change:.0f} s (--heartbeat_timeout "
                           f"{self.dead_after_s:g}): that process died, was killed or is stopped")
                store.set("dead", verdict)  # the other ranks read it at their next beat
                self._abort(verdict)

    def _abort(self, verdict: str) -> None:
        logger.error("rank %d: %s. Ending this process (exit %d): checkpoint-last.pth from before the fault is "
                     "intact; rerun the same command to resume.", self.info.rank, verdict, self._exit_code)
        for handler in logging.getLogger().handlers:
            handler.flush()
        with Heartbeat.writing:  # never cut a checkpoint write short
            os._exit(self._exit_code)

    def _counts(self) -> dict[int, int]:
        return {r: self.store.add(f"alive/{r}", 0) for r in range(self.info.world_size)}

    def report(self) -> str:
        try:
            before = self._counts()
            time.sleep(2.5 * self.interval_s)
            after = self._counts()
        except (RuntimeError, dist.DistError):
            return "rank 0 is unreachable (it hosts the heartbeat store), so it most likely died"
        dead = [r for r in range(self.info.world_size) if r != self.info.rank and after[r] == before[r]]
        if not dead:
            return "every other rank is still alive, so one may be stuck (deadlock, slow disk) rather than dead"
        return f"rank(s) {', '.join(map(str, dead))} stopped sending heartbeats: that process died or was killed"

    def close(self) -> None:
        """A clean end: the watcher of this rank must not take its silence for a death."""
        self._stop.set()
        try:
            self.store.set(f"done/{self.info.rank}", "1")
        except (RuntimeError, dist.DistError):
            logger.debug("rank %d: heartbeat store already closed; rank 0 has finished", self.info.rank)


# gloo's transport errors reach Python as plain RuntimeError (torch 2.14: "[.../third_party/gloo/gloo/transport/tcp/
# pair.cc:561] Connection closed by peer ..."); these parts of their text are all that tells them apart
GLOO_TRANSPORT_MARKERS = ("gloo/transport/", "Connection closed by peer", "Connection reset by peer")


def is_communication_failure(error: BaseException) -> bool:
    """A lost or stuck peer. torch raises a DistError subclass where it has one (NCCL's DistBackendError,
    DistNetworkError, DistStoreError); gloo gives no type, so a plain RuntimeError is recognised by its transport
    text (GLOO_TRANSPORT_MARKERS)."""
    if isinstance(error, dist.DistError):
        return True
    return type(error) is RuntimeError and any(marker in str(error) for marker in GLOO_TRANSPORT_MARKERS)


def peer_report() -> str:
    return Heartbeat.current.report() if Heartbeat.current else "no heartbeat information"


def all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default); a no-op without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor


class MainRankError(SetupError):
    """Rank 0 failed in work the other ranks were waiting for; the message is rank 0's error."""


def share_from_main(info: DistInfo, device: torch.device, produce) -> bytes:
    """Rank 0 runs produce() -> bytes and every rank receives them (two broadcasts: length, then payload).

    If produce() raises on rank 0, the other ranks raise MainRankError carrying its message at once, instead of
    waiting for --dist_timeout; rank 0 re-raises its own error."""
    if not info.distributed:
        return produce()
    payload, error = b"", None
    if info.is_main:
        try:
            payload = produce()
        except Exception as e:  # re-raised below, after the other ranks have been told
            error, payload = e, f"{type(e).__name__}: {e}".encode()
    header = torch.tensor([len(payload), error is not None], dtype=torch.int64, device=device)
    dist.broadcast(header, src=0)
    length, failed = header.tolist()
    buffer = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device) if info.is_main and length
              else torch.empty(length, dtype=torch.uint8, device=device))
    if length:
        dist.broadcast(buffer, src=0)
    if error is not None:
        raise error
    received = buffer.cpu().numpy().tobytes()
    if failed:
        raise MainRankError(f"rank 0 failed: {received.decode(errors='replace')}")
    return received


def describe(info: DistInfo) -> str:
    """One log line on the process group, once logging is set up."""
    if not info.distributed:
        return "single process, no process group"
    return (f"rank {info.rank}/{info.world_size} (local {info.local_rank}) on {socket.gethostname()} via "
            f"{info.source}, backend {dist.get_backend()}, master "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            + (" (--force_process_group)" if info.forced and info.world_size == 1 else ""))


def on_agent_store(env=None) -> bool:
    """Whether torchrun gave the ranks its agents' shared TCPStore, which is kept across --max-restarts (the default;
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives a fresh store per round instead)."""
    return (os.environ if env is None else env).get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def elastic_restart_problem(env=None) -> str | None:
    """torchrun --max-restarts over several nodes with the agents' shared TCPStore (torch's default) keeps that store
    across restarts, and each node's agent counts its own restarts: the agent whose worker crashed counts one, an agent
    whose workers were still alive (blocked in an NCCL collective, say) restarts them for the membership change and
    counts none. The restarted ranks then disagree on TORCHELASTIC_RESTART_COUNT, so on the per-attempt prefix, and
    some read the dead group's addresses. With TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in the agents' environment each
    round gets a fresh store hosted by the new rank 0, and nothing stale is left to read."""
    env = os.environ if env is None else env
    if (on_agent_store(env) and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
            and int(env.get("GROUP_WORLD_SIZE", "1")) > 1):
        return (f"torchrun --max-restarts {env['TORCHELASTIC_MAX_RESTARTS']} across {env['GROUP_WORLD_SIZE']} nodes "
                "shares the agents' store between restarts, and the nodes' agents can count restarts differently: a "
                "restart may then fail to form the group. Export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun "
                "on every node (scripts/slurm_pretrain.sh does) so that every restart starts from a fresh store.")
    return None


def host_layout(info: DistInfo) -> str:
    """Which ranks run on which host (a collective: every rank must call it), e.g. 'node0: 0 1; node1: 2 3'."""
    names = [None] * info.world_size
    dist.all_gather_object(names, socket.gethostname())
    hosts: dict[str, list[int]] = {}
    for rank, name in enumerate(names):
        hosts.setdefault(name, []).append(rank)
    return "; ".join(f"{name}: ranks {' '.join(map(str, ranks))}" for name, ranks in hosts.items())


def cleanup() -> None:
    if Heartbeat.current is not None:
        Heartbeat.current.close()
        Heartbeat.current = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
