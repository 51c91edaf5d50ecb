"""An output folder belongs to one run: checked writable, locked, never overwritten silently.

What the runner guarantees with it (docs/reliability.md):

* a run starts only in a folder it can write (checked before any model is built, with a clear message for a
  read-only folder, a path under a file, or a virtual file system such as /proc);
* ``<out>/.lock`` holds the owning pid and host: a second run into the folder is refused while the owner lives;
  a lock left by a dead process of this host is taken over, and says so (a lock from another host is refused:
  only that host can tell whether its owner still runs);
* a folder holding a run (checkpoint, metrics, final.json or model/) is refused unless the run is resumed, or
  replaced with ``overwrite``; the previous run is then deleted only once the new one has saved its first epoch,
  so a new run that fails to start leaves the old one intact;
* leftovers of interrupted atomic writes (``.<name>.tmp-<pid>``, ``.model.tmp``, ``.model.old``) are removed when
  the next run claims the folder;
* the folder says whether its run can resume (a checkpoint) and whether it has finished (``final.json``, written
  last, beside a checkpoint of all the epochs); a finished run given more epochs is extended, its result retired.

``final.json``'s test accuracies are read with :func:`deployed_accuracy` and :func:`as_trained_accuracy`, which
take records written before ``test_acc_deployed`` / ``test_acc_as_trained`` existed too (docs/cli.md).
"""
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Dict, List, Optional

from .checkpoint import TMP_MARK
from ..errors import JointRDError
from ..faults import fault_point
from ..io import file_in_the_way

__all__ = ['RunFolder', 'RunFolderError', 'check_writable', 'checkpoint_epochs', 'read_metrics', 'deployed_accuracy',
           'as_trained_accuracy', 'RUN_FILES', 'LOCK_NAME']

RUN_FILES = ('last.safetensors', 'metrics.jsonl', 'final.json', 'model')
LOCK_NAME = '.lock'
VIRTUAL_ROOTS = ('/proc', '/sys', '/dev')


class RunFolderError(JointRDError, RuntimeError):
    """The output folder cannot be written, is in use, or holds a run that this one would replace."""


def check_writable(out: Path) -> None:
    """Create ``out`` and write a probe file in it, or raise a :class:`RunFolderError` saying why not."""
    absolute = Path(os.path.abspath(out))
    for root in VIRTUAL_ROOTS:
        if str(absolute) == root or str(absolute).startswith(root + '/'):
            raise RunFolderError(f'Output folder {out} is inside {root}, a virtual file system that cannot hold a '
                                 'run; choose another --output-dir.')
    blocker = file_in_the_way(absolute)
    if blocker is not None:
        raise RunFolderError(f'Output folder {out} cannot be created: {blocker} is a file, not a folder; choose '
                             'another --output-dir.')
    probe = absolute / f'.write-probe{TMP_MARK}{os.getpid()}'
    try:
        absolute.mkdir(parents=True, exist_ok=True)
        fault_point('folder_probe')
        with open(probe, 'wb') as f:
            f.write(b'probe')
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise RunFolderError(f'Output folder {out} is not writable ({e.strerror or e}); nothing was trained. Choose '
                             'a writable --output-dir (or free space / fix permissions there).') from e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet waited for is a zombie: it holds nothing any more
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return True


def checkpoint_epochs(path: Path) -> Optional[int]:
    """Epochs held by a runner checkpoint (its metadata only; None when unreadable)."""
    from safetensors import safe_open
    try:
        with safe_open(str(path), 'pt') as f:
            return int((f.metadata() or {})['epoch']) + 1
    except Exception:  # noqa: BLE001 - any unreadable file: the full load reports it properly
        return None


def read_metrics(path: Path, epochs: Optional[int] = None) -> List[Dict]:
    """The per-epoch records of a ``metrics.jsonl`` (one per epoch, the last readable one, by epoch; only epochs
    1..``epochs`` when given). A torn last line, left by a kill mid-write, is skipped."""
    records = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get('epoch'), int) and record['epoch'] >= 1 \
                and (epochs is None or record['epoch'] <= epochs):
            records[record['epoch']] = record
    return [records[e] for e in sorted(records)]


class RunFolder:
    """The output folder of one run, claimed by the main process (see the module docstring)."""

    def __init__(self, path, resume: bool = False, overwrite: bool = False, say=print):
        if resume and overwrite:
            raise RunFolderError('resume and overwrite exclude each other: resume continues the run in the folder, '
                                 'overwrite replaces it.')
        self.path, self.resume, self.overwrite, self.say = Path(path), resume, overwrite, say
        self.lock = self.path / LOCK_NAME
        self.replacing = False  # an overwritten run still to delete (at the first save)
        self.owned = False
        self.created = False  # the folder was made by this claim (removed again if the run leaves it empty)

    @property
    def checkpoint(self) -> Path:
        return self.path / 'last.safetensors'

    def describe(self) -> str:
        """What the folder holds, in words (for the refusal)."""
        if (self.path / 'final.json').is_file():
            return 'a finished run (final.json)'
        epochs = checkpoint_epochs(self.checkpoint) if self.checkpoint.is_file() else None
        if epochs is not None:
            return f'an unfinished run ({epochs} epoch(s) saved in last.safetensors)'
        present = [n for n in RUN_FILES if (self.path / n).exists()]
        return f'files of a run ({", ".join(present)})'

    def can_resume(self) -> bool:
        """Whether the folder holds a checkpoint to continue from."""
        return self.checkpoint.is_file()

    def saved_epochs(self) -> Optional[int]:
        """Epochs held by the folder's checkpoint (None without a readable one)."""
        return checkpoint_epochs(self.checkpoint) if self.checkpoint.is_file() else None

    def metrics(self) -> List[Dict]:
        """The per-epoch records of the run (``metrics.jsonl``, :func:`read_metrics`); empty before its first epoch."""
        return read_metrics(self.path / 'metrics.jsonl')

    def final(self) -> Optional[Dict]:
        """The run's ``final.json`` record; None while no run in the folder has finished."""
        path = self.path / 'final.json'
        return json.loads(path.read_text()) if path.is_file() else None

    def is_finished(self, num_epochs: int) -> bool:
        """Whether the folder holds a finished run of ``num_epochs`` epochs (or more). A ``final.json`` beside a
        checkpoint of fewer epochs is the end of a shorter run, which a resume with more epochs extends."""
        saved = self.saved_epochs()
        return (self.path / 'final.json').is_file() and saved is not None and saved >= num_epochs

    def extend(self, num_epochs: int) -> bool:
        """Before a resume continues a run: when a shorter run had finished here, its ``final.json`` and ``model/``
        are removed, so nothing reads them as this run's result until it ends (main process only). Returns whether
        there was one."""
        if not (self.path / 'final.json').is_file():
            return False
        self.say(f'Extending the finished run in {self.path} from {self.saved_epochs()} to {num_epochs} epochs: its '
                 'final.json and model/ are removed until this run ends.')
        (self.path / 'final.json').unlink()
        shutil.rmtree(self.path / 'model', ignore_errors=True)
        return True

    def check_reuse(self) -> bool:
        """Refuse what the folder holds unless this run may use it: ``resume`` needs a checkpoint; a folder holding
        a run needs ``resume`` or ``overwrite``. Returns True when this run will replace the folder's run."""
        if self.resume and not self.can_resume():
            raise RunFolderError(f'--resume: no checkpoint at {self.checkpoint}; run without --resume to start '
                                 'a new run there.')
        if self.resume or not any((self.path / n).exists() for n in RUN_FILES):
            return False
        if not self.overwrite:
            raise RunFolderError(
                f'{self.path} already holds {self.describe()}. Continue it with --resume (train(..., '
                'resume=True)), replace it with --overwrite (overwrite=True: deleted once the new run has '
                'saved its first epoch), or choose another --output-dir.')
        return True

    def claim(self) -> None:
        """Check writability, take the lock, apply the resume/overwrite policy, clean leftovers."""
        self.created = not self.path.exists()
        check_writable(self.path)
        self._lock()
        try:
            self.replacing = self.check_reuse()
            if self.replacing:
                self.say(f'--overwrite: {self.path} holds {self.describe()}; it is kept until this run has saved '
                         'its first epoch, then deleted.')
            self._clean_leftovers()
        except BaseException:
            self.release()
            raise

    def _lock(self) -> None:
        record = json.dumps(dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime('%Y-%m-%d %H:%M:%S')))
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over_stale(record)
        else:
            with os.fdopen(fd, 'w') as f:
                f.write(record)
        self.owned = True

    def _take_over_stale(self, record: str) -> None:
        try:
            owner = json.loads(self.lock.read_text())
            pid, host = int(owner['pid']), owner['host']
        except (OSError, ValueError, KeyError, TypeError):
            owner, pid, host = {}, None, socket.gethostname()  # a lock cut short by a kill while being written
        if host != socket.gethostname():
            raise RunFolderError(f'{self.path} is locked by a run on host {host} (pid {pid}, started '
                                 f'{owner.get("started")}); this host cannot tell whether it still runs. Wait for '
                                 f'it, or delete {self.lock} if you know it has ended.')
        if pid is not None and _pid_alive(pid):
            raise RunFolderError(f'{self.path} is in use by another run (pid {pid} on this host, started '
                                 f'{owner.get("started")}); wait for it to end or choose another --output-dir.')
        self.say(f'Taking over the stale lock of {self.path} (pid {pid} is no longer running).')
        tmp = self.lock.with_name(f'{LOCK_NAME}{TMP_MARK}{os.getpid()}')
        tmp.write_text(record)
        os.replace(tmp, self.lock)

    def _clean_leftovers(self) -> None:
        leftovers = [p for p in self.path.iterdir()
                     if TMP_MARK in p.name or p.name in ('.model.tmp', '.model.old')]
        for p in leftovers:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if leftovers:
            self.say(f'Removed leftovers of an interrupted write in {self.path}: {sorted(p.name for p in leftovers)}.')

    def before_save(self) -> None:
        """Called before every checkpoint save: the first one of an overwriting run retires the old run's
        final.json first, so no reader ever sees the old "finished" marker beside the new checkpoint."""
        if self.replacing:
            (self.path / 'final.json').unlink(missing_ok=True)

    def after_save(self) -> None:
        """After the first checkpoint of an overwriting run: the rest of the old run goes."""
        if self.replacing:
            shutil.rmtree(self.path / 'model', ignore_errors=True)
            (self.path / 'metrics.jsonl').unlink(missing_ok=True)
            self.replacing = False
            self.say(f'--overwrite: the previous run in {self.path} is deleted; this run has saved its first epoch.')

    def release(self) -> None:
        """Give the lock back; a folder this run created and left empty (it failed before its first save) goes
        too, so a failed start leaves nothing behind."""
        if self.owned:
            self.lock.unlink(missing_ok=True)
            self.owned = False
            if self.created:
                try:
                    self.path.rmdir()  # only when empty
                except OSError:
                    pass


def deployed_accuracy(final: Dict) -> Optional[float]:
    """Test top-1 (%) of the model a run deployed (``model/``: BatchNorm recalibrated, Dirac folded, faded shortcuts
    removed) from its ``final.json`` record: ``test_acc_deployed``, or in a record written before that key,
    ``test_acc_folded`` when present, else ``test_acc``. None for a run without a test split."""
    for key in ('test_acc_deployed', 'test_acc_folded', 'test_acc'):
        if key in final:
            return final[key]
    return None


def as_trained_accuracy(final: Dict) -> Optional[float]:
    """Test top-1 (%) of the model as it left training (before the BatchNorm recalibration and folding) from its
    ``final.json`` record: ``test_acc_as_trained``, or ``test_acc`` in older records. None without a test split."""
    return final.get('test_acc_as_trained', final.get('test_acc'))
