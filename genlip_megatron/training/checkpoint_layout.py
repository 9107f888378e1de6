"""The checkpoint folder layout: the one place that knows how a ``save_dir`` is organised.

Layout of ``save_dir``::

    iter_0000100/            one finished checkpoint (holds megatron's metadata.json and COMPLETE)
    iter_0000200.tmp/        a save in progress (or one that crashed): never chosen, removed later
    iter_0000200.old/        the previous copy of a re-saved step, moved aside during the swap
    iter_0000050.removing/   a checkpoint being pruned (renamed first, then deleted)
    latest                   text file naming the newest finished checkpoint ("iter_0000200")
    iter_0000300.superseded-20261206T071500/   a finished checkpoint of an abandoned line of
                             training (the run resumed from an older one): kept, never chosen,
                             never pruned (:func:`supersede_checkpoint`)
    .lock                    locked (``lockf``) by the job training into this save_dir
                             (:func:`lock_save_dir`); names the holder's job id, host and pid

Publish protocol (:func:`publish_checkpoint`): a save writes into ``iter_N.tmp``; once every shard
is on disk its files and the folder are fsynced, the :data:`COMPLETE` marker is written (and
fsynced) into it, an existing ``iter_N`` is moved aside to ``iter_N.old`` (never deleted before
the new copy is in place), ``.tmp`` is renamed to ``iter_N`` and ``latest`` is replaced
atomically (write, fsync, rename, fsync dir).
A crash at any instant leaves a finished copy of every published step, and
:func:`recover_interrupted_publish` (the trainer, at start-up) completes the publication.

Which checkpoint a path means (:func:`resolve_checkpoint`), for every reader alike (trainer
resume and ``training.init_from``, ``to-hf``, the probes): a checkpoint directory itself; else
the one ``latest`` names when that is a finished checkpoint; else (pointer missing, garbage or
dangling: logged) the newest finished checkpoint, by step number.

"Finished" means an ``iter_N`` directory (exact name, no suffix) holding megatron's
``metadata.json``, which ``dist_checkpointing.save`` writes after every shard: checkpoints
saved before the ``COMPLETE`` marker existed, and those of other Megatron writers, stay
loadable. A trainer-published ``iter_N`` only ever appears by the rename of a complete ``.tmp``.

No torch and no megatron import here: the CLI tools, the probes and tests read the layout
without loading the training stack.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger(__name__)

LATEST = "latest"
"""Pointer file in ``save_dir`` naming the newest finished checkpoint."""
COMPLETE = "COMPLETE"
"""Marker file written (and fsynced) last into ``iter_N.tmp`` once every rank's shards are on
disk: a ``.tmp`` holding it is a complete checkpoint whose publication was interrupted."""
METADATA = "metadata.json"
"""megatron ``dist_checkpointing``'s backend file, written after every shard of a save."""
TMP, OLD, REMOVING = ".tmp", ".old", ".removing"
"""Suffixes of the sibling directories that are never a finished checkpoint."""
SUPERSEDED = ".superseded-"
"""Infix of a finished checkpoint moved aside, followed by a UTC timestamp: never a finished
checkpoint again (the name is no exact ``iter_N``), never pruned."""
LOCK = ".lock"
"""Lock file in ``save_dir``: locked (``lockf``) by the one job training into it."""

_ITER_RE = re.compile(r"^iter_(\d{7,})$")


class CheckpointError(RuntimeError):
    """A checkpoint problem the user must act on (damaged file, refused resume): one line."""


# ------------------------------------------------------------------------------ names
def iteration_dir(save_dir: str | Path, step: int) -> Path:
    """``save_dir/iter_000000N`` (7 digits at least, as Megatron-LM names them)."""
    return Path(save_dir) / f"iter_{step:07d}"


def sibling(final: Path, suffix: str) -> Path:
    """``iter_N`` + one of :data:`TMP`, :data:`OLD`, :data:`REMOVING`."""
    return final.with_name(final.name + suffix)


def unsuffixed(path: Path) -> Path:
    """``iter_N`` of an ``iter_N.tmp``/``.old``/``.removing`` sibling."""
    for suffix in (TMP, OLD, REMOVING):
        if path.name.endswith(suffix):
            return path.with_name(path.name[: -len(suffix)])
    return path


def checkpoint_step(path: str | Path) -> Optional[int]:
    """N of an ``iter_N`` directory name, None for anything else (``.tmp`` siblings too)."""
    match = _ITER_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_checkpoint_dir(path: str | Path) -> bool:
    """Whether ``path`` itself holds a checkpoint (any name: the user pointed at it)."""
    return (Path(path) / METADATA).is_file()


def is_finished(path: str | Path) -> bool:
    """A published ``iter_N`` directory holding megatron's ``metadata.json``."""
    path = Path(path)
    return checkpoint_step(path) is not None and is_checkpoint_dir(path)


def finished_checkpoints(save_dir: str | Path) -> list[Path]:
    """Finished checkpoint directories, oldest first by step number (siblings excluded)."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_finished(p)),
                  key=checkpoint_step)


def interrupted_publications(save_dir: str | Path) -> list[Path]:
    """``iter_N.tmp`` saves holding :data:`COMPLETE` with no ``iter_N`` beside them, oldest
    first: finished saves a crash stopped before the rename (the trainer publishes them at
    start-up, :func:`recover_interrupted_publish`)."""
    root = Path(save_dir)
    if not root.is_dir():
        return []
    found = [tmp for tmp in root.glob("iter_*" + TMP)
             if (tmp / COMPLETE).is_file() and checkpoint_step(unsuffixed(tmp)) is not None
             and not unsuffixed(tmp).exists()]
    return sorted(found, key=lambda tmp: checkpoint_step(unsuffixed(tmp)))


# ------------------------------------------------------------------------------ latest
def read_latest(save_dir: str | Path) -> tuple[Optional[Path], str]:
    """(checkpoint named by ``latest``, "") or (None, why the pointer is unusable).

    The reason is "" when there is no pointer at all.
    """
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None, ("" if not pointer.exists() else f"{pointer} is not a file")
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"{pointer} is unreadable ({type(exc).__name__})"
    if not _ITER_RE.match(name):   # a bare name: a path could leave save_dir
        return None, f"{pointer} holds {name[:40]!r}, not an iter_N name"
    target = Path(save_dir) / name
    if not is_finished(target):
        return None, f"{pointer} names {name}, which is not a finished checkpoint"
    return target, ""


def write_latest(save_dir: str | Path, name: str) -> None:
    """Point ``latest`` at ``name`` atomically and durably (write, fsync, rename, fsync dir):
    a crash leaves the old pointer or the new one, never a torn file."""
    root = Path(save_dir)
    tmp_pointer = root / (LATEST + TMP)
    _write_durable(tmp_pointer, name + "\n")
    os.replace(tmp_pointer, root / LATEST)
    _fsync_dir(root)


def mark_complete(tmp: Path, name: str) -> None:
    """Write the :data:`COMPLETE` marker into a save whose files are all on disk."""
    _write_durable(tmp / COMPLETE, name + "\n")


def sync_files(folder: Path) -> None:
    """fsync every file directly in ``folder`` (megatron's ``metadata.json`` and ``common.pt``
    included), then the folder itself.

    torch DCP fsyncs the shards it writes, but not megatron's own files; without this a power
    loss after ``latest`` moved and older checkpoints were pruned could leave the only
    "finished" checkpoint with an empty ``metadata.json``. Files already on disk cost one
    cheap ``fsync`` each.
    """
    for path in sorted(folder.iterdir()):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ resolution
def resolve_checkpoint(path: str | Path, warn: Callable[..., None] = logger.warning
                       ) -> Optional[Path]:
    """The checkpoint ``path`` means: itself when it holds one; for a save dir the one
    ``latest`` names, else (pointer missing, garbage or dangling) the newest finished one.

    Only reads: a complete save whose publication a crash interrupted (a marked ``.tmp``) is
    not chosen, but named in a warning when it is newer; the trainer publishes it at start-up
    (:func:`recover_interrupted_publish`) before it resolves.

    Args:
        warn: logs the fallback (``logging`` style); the trainer passes a rank-0-only logger.

    Returns:
        None for a save dir without finished checkpoints and without a pointer.

    Raises:
        CheckpointError: a damaged pointer and no finished checkpoint to fall back to.
    """
    path = Path(path)
    if is_checkpoint_dir(path):
        return path
    target, problem = read_latest(path)
    if target is None:
        done = finished_checkpoints(path)
        if not done:
            if problem:
                raise CheckpointError(f"{problem}, and {path} holds no finished checkpoint.")
            return None
        target = done[-1]
        warn("%s; using the newest finished checkpoint %s instead.",
             problem or f"{path / LATEST} is missing", target.name)
    pending = interrupted_publications(path)
    if pending and checkpoint_step(unsuffixed(pending[-1])) > checkpoint_step(target):
        warn("%s is a complete save whose publication a crash interrupted (the trainer "
             "publishes it when it restarts); reading %s. Pass %s itself to read that one.",
             pending[-1].name, target.name, pending[-1])
    return target


# ------------------------------------------------------------------------------ publish
def publish_checkpoint(tmp: Path, final: Path, fault=lambda point: None) -> None:
    """Make the complete save in ``tmp`` the checkpoint ``final`` and point ``latest`` at it.

    Crash-safe at every instant: a finished copy of the step (old or new) always exists, either
    as ``final`` or as a marked ``.tmp``/``.old`` that :func:`recover_interrupted_publish` turns
    back into ``final``; ``latest`` always names a finished checkpoint. ``fault(point)`` is the
    fault-injection hook of the crash tests.
    """
    sync_files(tmp)
    mark_complete(tmp, final.name)
    fault("marked")
    old = sibling(final, OLD)
    replaced = final.exists()
    if replaced:  # re-saving a step: move the previous copy aside, never delete it first
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        fault("moved_aside")
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    fault("renamed")
    write_latest(final.parent, final.name)
    if replaced:
        shutil.rmtree(old, ignore_errors=True)


def recover_interrupted_publish(save_dir: str | Path) -> list[Path]:
    """Finish publications a crash interrupted (one process, before anyone looks for
    checkpoints).

    - ``iter_N.tmp`` holding :data:`COMPLETE` with no ``iter_N``: renamed to ``iter_N`` and
      ``latest`` moved to it when newer than the pointer's target;
    - ``iter_N.old`` (the previous copy of a re-saved step, moved aside): removed when ``iter_N``
      is finished, renamed back otherwise;
    - ``latest`` older than the newest finished checkpoint that a crash kept it from naming:
      moved to it (:func:`_catch_up_latest`).
    Incomplete ``.tmp`` directories are left for :func:`prune_checkpoints`.
    Returns the recovered checkpoints.
    """
    root = Path(save_dir)
    if not root.is_dir():
        return []
    recovered = []
    for tmp in interrupted_publications(root):
        final = unsuffixed(tmp)
        os.replace(tmp, final)
        recovered.append(final)
        logger.warning("recovered %s: its save had finished but a crash interrupted the "
                       "publication.", final)
    for old in sorted(root.glob("iter_*" + OLD)):
        final = unsuffixed(old)
        if is_finished(final):
            shutil.rmtree(old, ignore_errors=True)
        elif not final.exists():
            os.replace(old, final)
            logger.warning("restored %s from %s (a crash interrupted its replacement).",
                           final, old.name)
    if recovered:
        _fsync_dir(root)
        current, _ = read_latest(root)
        newest = max(recovered, key=checkpoint_step)
        if current is None or checkpoint_step(current) < checkpoint_step(newest):
            write_latest(root, newest.name)
    _catch_up_latest(root)
    return recovered


def lagging_latest(save_dir: str | Path) -> Optional[Path]:
    """The newest finished checkpoint when a crash came between its rename and the ``latest``
    update (``latest`` names an older one), else None.

    Told apart from a user's deliberate choice of an older checkpoint by time: the lagging
    pointer was last written before the newer checkpoint's :data:`COMPLETE` marker, a pointer
    edited by hand after it. Checkpoints without the marker (other writers) never count.
    """
    root = Path(save_dir)
    current, _ = read_latest(root)
    done = finished_checkpoints(root)
    if current is None or not done or checkpoint_step(done[-1]) <= checkpoint_step(current):
        return None
    try:
        marked = (done[-1] / COMPLETE).stat().st_mtime_ns
        pointed = (root / LATEST).stat().st_mtime_ns
    except OSError:   # no marker: not published by this protocol
        return None
    return done[-1] if marked > pointed else None


def _catch_up_latest(root: Path) -> None:
    """Point ``latest`` at :func:`lagging_latest` (else the run would redo up to
    ``save_interval`` steps)."""
    newest = lagging_latest(root)
    if newest is not None:
        current, _ = read_latest(root)
        write_latest(root, newest.name)
        logger.warning("published %s: %s still named %s (a crash came between the rename and "
                       "the pointer update).", newest.name, LATEST, current.name)


# ------------------------------------------------------------------------------ removal
def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint directory; renamed aside first, so a kill mid-removal never leaves
    a half-deleted directory that still looks finished."""
    doomed = sibling(path, REMOVING)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def prune_checkpoints(save_dir: Path, keep: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` finished checkpoints (all when 0, and always ``keep``, the
    one just published); remove incomplete ``.tmp`` saves and interrupted removals."""
    done = finished_checkpoints(save_dir)
    if keep_last > 0:
        for old in done[: max(0, len(done) - keep_last)]:
            if old != keep:
                remove_checkpoint(old)
    for stale in [*save_dir.glob("iter_*" + TMP), *save_dir.glob("iter_*" + REMOVING)]:
        shutil.rmtree(stale, ignore_errors=True)


def supersede_checkpoint(path: Path) -> Path:
    """Move a finished checkpoint aside to ``iter_N.superseded-<UTC time>`` and return that.

    Used when a run resumed from an older checkpoint and its new line of training would
    replace (or prune) the newer ones: those are kept, under a name that is never chosen,
    pruned or recovered, for the user to inspect or delete.
    """
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside = path.with_name(f"{path.name}{SUPERSEDED}{stamp}")
    suffix = 0
    while aside.exists():   # two in one second: never overwrite a kept copy
        suffix += 1
        aside = path.with_name(f"{path.name}{SUPERSEDED}{stamp}-{suffix}")
    os.replace(path, aside)
    _fsync_dir(path.parent)
    return aside


# ------------------------------------------------------------------------------ lock
class SaveDirInUse(CheckpointError):
    """Another live job holds the ``save_dir`` lock."""


def _holder_description(lock_path: Path) -> str:
    """"job J on host H (pid P)" from the lock file, as far as it can be read."""
    try:
        fields = dict(line.split("=", 1) for line in
                      lock_path.read_text(encoding="utf-8").splitlines() if "=" in line)
    except OSError:
        fields = {}
    return (f"job {fields.get('job', '?')} on host {fields.get('host', '?')} "
            f"(pid {fields.get('pid', '?')})")


_NO_LOCKING = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)
"""A file system without locks (Lustre ``noflock``, some FUSE mounts): warn, do not refuse."""


def lock_save_dir(save_dir: str | Path, job_id: str) -> Optional[int]:
    """Take the exclusive lock of ``save_dir`` for this process's lifetime; returns its fd
    (None, after a warning, where the file system supports no locks).

    Two jobs training into one save_dir (a resubmitted config) would prune and rename each
    other's checkpoints. A POSIX record lock (``lockf``, native on NFS and on Lustre mounted
    with ``flock``) is released by the kernel when the holder dies (SIGKILL, OOM-kill), so a
    stale lock never blocks a requeued job; unlike ``flock`` it is not shared with forked
    children, so a loader worker that outlives a killed trainer does not keep it. The
    holder's job id, host and pid are written into the file for the refusal message.
    Keep the returned descriptor open and open the file nowhere else in this process (closing
    any descriptor of it releases a POSIX lock); close it (or exit) to release.

    Raises:
        SaveDirInUse: another process holds the lock (one line naming it).
    """
    lock_path = Path(save_dir) / LOCK
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_LOCKING:
            logger.warning("%s cannot be locked (%s: the file system does not support locks): "
                           "a second job on this save_dir will not be detected.", lock_path,
                           os.strerror(exc.errno))
            return None
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise SaveDirInUse(
            f"checkpoint.save_dir {save_dir} is in use by {_holder_description(lock_path)}; "
            "wait for that job to end (or cancel it), or choose another checkpoint.save_dir."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"job={job_id}\nhost={socket.gethostname()}\npid={os.getpid()}\n".encode())
    os.fsync(fd)
    return fd
