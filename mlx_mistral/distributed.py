"""Tensor parallelism: one model spread over the processes of an `mx.distributed` group.

Started by `mlx.launch` (ring over TCP or Thunderbolt, MPI, JACCL), every rank runs the
same program on the same tokens and holds 1/N of every layer (shard.py says how it is
split). This module starts the group, loads every rank's share (loading.load with the
group) so that one rank's failure fails them all, and keeps the ranks' samplers and output
in step.
"""

import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout

import mlx.core as mx

from .config import ModelArgs
from .errors import MistralError
from .loading import load as load_one
from .model import Mistral
from .sample import Sampler
from .tokenizer import Tokenizer

DEFAULT_CONNECT_TIMEOUT = 60.0  # seconds for every rank to reach the others

# Run beside mx.distributed.init, which blocks without a timeout (the ring backend accepts
# forever) and holds the GIL while it does, so no Python thread of ours can run meanwhile.
_WATCHDOG = """import os, select, signal, sys
if not select.select([sys.stdin], [], [], float(sys.argv[2]))[0]:
    sys.stderr.write(sys.argv[3] + "\\n")
    sys.stderr.flush()
    os.kill(int(sys.argv[1]), signal.SIGKILL)
"""


def launched() -> bool:
    """True in a process that mlx.launch (or mpirun) started as one rank of several."""
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile is not None and os.path.isfile(hostfile) and os.path.getsize(hostfile) == 0:
        return False  # mlx.launch on one host writes an empty hostfile
    return "MLX_RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ


def init(timeout: float = DEFAULT_CONNECT_TIMEOUT) -> mx.distributed.Group | None:
    """The group of ranks mlx.launch started, or None in a process it did not start (or with
    one rank). A rank that cannot reach the others within `timeout` seconds prints one
    `error:` line and ends (killed by a watchdog process: the wait cannot be interrupted)."""
    if not launched():
        return None
    if not timeout > 0:
        raise MistralError(f"connect timeout must be a positive number of seconds, got {timeout!r}")
    rank = os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))
    message = (f"error: rank {rank}: the other ranks did not connect within {timeout:g} s (hostfile "
               f"{os.environ.get('MLX_HOSTFILE', '-')}); is every rank started, with the same hostfile, "
               f"and are its addresses reachable? (--connect-timeout sets the wait)")
    watchdog = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHDOG, str(os.getpid()), str(timeout),
                                 message], stdin=subprocess.PIPE)
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        raise MistralError(f"rank {rank}: could not join the distributed group ({e})") from None
    finally:
        watchdog.stdin.close()  # end of input: the watchdog exits without firing
        watchdog.wait()
    if group.size() == 1:
        raise MistralError(f"rank {rank}: started as one rank of several, but the distributed group has "
                           f"only this process (check the launcher's backend and hostfile)")
    return group


def load(path_or_repo: str, group: mx.distributed.Group, dtype: mx.Dtype | None = None,
         gguf_bits: int | None = None) -> tuple[Mistral, Tokenizer]:
    """loading.load of this rank's share on every rank of `group`; if any rank fails, all
    fail with a clear error instead of waiting for it on their first all_sum."""
    try:
        model, tokenizer = load_one(path_or_repo, dtype, group, gguf_bits)
    except MistralError as e:
        check_loaded(group, None, e)
    check_loaded(group, model.args, None)
    return model, tokenizer


def check_loaded(group: mx.distributed.Group, args: ModelArgs | None, error: Exception | None) -> None:
    """Every rank calls this once its model is loaded (args) or failed to (error): all raise
    MistralError unless every rank loaded the same config."""
    fingerprint = zlib.crc32(repr(args).encode()) & 0x7FFFFFFF if args else 0
    mine = mx.array([int(error is not None), fingerprint], dtype=mx.int32)
    rank, n = group.rank(), group.size()
    try:
        every = mx.distributed.all_gather(mine[None], group=group).tolist()
    except RuntimeError as e:  # a rank ended without reaching this point
        raise MistralError(f"rank {rank} of {n}: lost the connection to the other ranks ({e})") from None
    if error is not None:
        raise MistralError(f"rank {rank} of {n}: {error}")
    failed = [r for r, (bad, _) in enumerate(every) if bad]
    if failed:
        raise MistralError(f"rank {', '.join(map(str, failed))} of {n} could not load the model (see its error)")
    differ = [r for r, (_, f) in enumerate(every) if f != fingerprint]
    if differ:
        raise MistralError(f"rank {', '.join(map(str, differ))} of {n} loaded a model with another config "
                           f"than rank {rank}: every rank needs the same checkpoint")


def shared_sampler(sampler: Sampler, group: mx.distributed.Group) -> Sampler:
    """`sampler` whose tokens are rank 0's on every rank (its token goes to all with one small
    all_sum; the others add zeros), so the ranks stay in step even when their logits differ in
    the last bit (different chips) or their random state differs."""
    def sample(logits: mx.array, positions=None) -> mx.array:
        y = sampler(logits, positions)
        # y * 0, not zeros: the all_sum must come after this step's layers on every rank, since
        # collectives pair up in the order each rank runs them (a free-standing one deadlocks).
        return mx.distributed.all_sum(y if group.rank() == 0 else y * 0, group=group)

    return sample


@contextmanager
def rank_zero_output(group: mx.distributed.Group) -> Iterator[None]:
    """Rank 0 prints; the other ranks are silent (their errors still print, after the block).

    On the way out every rank waits for the others (the decode loop leaves one step in
    flight, and a rank that exits during another's all_sum makes it fail). An MLX error
    (such as a rank that died: "[ring] connection to a peer was lost") becomes one line.
    """
    rank, n = group.rank(), group.size()
    try:
        with open(os.devnull, "w") as null, redirect_stdout(null if rank else sys.stdout), \
                redirect_stderr(null if rank else sys.stderr):
            yield
        mx.synchronize()
        mx.eval(mx.distributed.all_sum(mx.array(1), group=group))
    except RuntimeError as e:
        raise MistralError(f"rank {rank} of {n}: {e} (did another rank fail? see its output)") from None
