"""Builds C sources into one shared library, whole or not at all (standard library only).

Run as a script (``python _build_c.py SOURCES TARGET COMPILER...``, SOURCES joined by ``os.pathsep``) in a
process of its own session (:class:`Builds`), by ``_native`` and by jax_side's ``_cpu_kernel`` (which loads
this file by its path: it never imports torch_side), so that a build started by a short-lived process still completes and lands in the cache. The
library is compiled under a temporary name, made readable by all, flushed to disk, and its SHA-256 is
written beside it (``TARGET.sha256``) before both are renamed into place: a reader that finds the hash
and a library that matches it has a whole library (a truncated one can crash the loading process).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import platform
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-pthread")
TIMEOUT_S = 120.0
# at most this many seconds, a process exiting waits for its build thread to start the builder
LAUNCH_WAIT_S = 30.0


UNWRITABLE = 2  # the exit code when the target's folder cannot take the build


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def compiler() -> list[str]:
    """The machine's C compiler: ``$CC``, else ``cc``, ``gcc`` or ``clang``.

    Raises:
        LookupError: none found.
    """
    chosen = os.environ.get("CC")
    if chosen:
        return shlex.split(chosen)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    raise LookupError("no C compiler found (set CC, or install cc, gcc or clang)")


def _cpu_features() -> str:
    """What a build for ``-march=native`` depends on: the CPU's feature flags where Linux lists them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def machine_key() -> str:
    """What a build depends on besides its sources: the flags, the compiler chosen, the platform and the
    CPU's features (a cache shared by machines with other CPUs holds one build per CPU)."""
    return "\0".join(
        [" ".join(FLAGS), os.environ.get("CC", ""), platform.platform(), platform.machine(), _cpu_features()]
    )


class Builds:
    """Runs this file as the builder of one side's kernel, in a process of its own session (an interrupt of
    the caller's terminal does not stop it halfway; a build into the cache outlives the caller and lands
    there), and stops at the caller's exit a build made for that process only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # a build for this process only starts before the exit handler looks
        self.exiting = False  # set at exit: a build for this process only may no longer start
        self._private: subprocess.Popen[str] | None = None
        self._launched = threading.Event()  # set once the build thread started its builder, or ended
        if hasattr(os, "register_at_fork"):  # a child forked while a thread held the lock would wait forever
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        """A forked child has none of the parent's threads, and the parent's build is not its own."""
        self._lock = threading.Lock()
        self._private = None
        self._launched = threading.Event()

    def start(self, work: Callable[[], None], name: str) -> threading.Thread:
        """Runs ``work`` (which calls :meth:`run`) in a daemon thread of that name. At the caller's exit, waits
        until that thread has started its builder or ended (at most ``LAUNCH_WAIT_S``): a process that exits
        at once, or whose thread got no CPU before the exit, still leaves its build to land in the cache."""
        self._launched.clear()
        thread = threading.Thread(target=self._launching(work), name=name, daemon=True)
        atexit.register(self._until_launched, os.getpid())
        thread.start()
        return thread

    def _launching(self, work: Callable[[], None]) -> Callable[[], None]:
        def launching() -> None:
            try:
                work()
            finally:
                self._launched.set()

        return launching

    def _until_launched(self, owner: int) -> None:
        if os.getpid() != owner:  # a forked child inherits the handler, not the thread
            return
        self._launched.wait(LAUNCH_WAIT_S)  # set by run at the launch, or by the thread as it ends

    def run(self, sources: list[str], target: str, compiler: list[str], *, private: bool) -> tuple[int, str]:
        """Builds ``sources`` into ``target`` and waits: the builder's exit code (0, 1, or
        :data:`UNWRITABLE`) and its complaint.

        Raises:
            RuntimeError: a build for this process only, asked for while it exits.
            OSError: the builder could not be started.
        """
        try:
            with self._lock:
                if private and self.exiting:
                    raise RuntimeError("the process is exiting")
                proc = subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), os.pathsep.join(sources), target, *compiler],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                )  # fmt: skip
                if private:
                    self._private = proc
        finally:
            self._launched.set()
        _, stderr = proc.communicate()
        return proc.returncode, stderr.strip()

    def stop_at_exit(self, folder: str | os.PathLike[str], owner: int) -> None:
        """Registered with ``atexit`` for the folder of a build for this process only: stops that build if it
        still runs (the builder leads its own process group: its compiler goes with it) and removes the
        folder; not in a forked child, which inherits the handler but not the build."""
        if os.getpid() != owner:
            return
        with self._lock:
            self.exiting = True
            build = self._private
        if build is not None and build.poll() is None:
            try:
                os.killpg(build.pid, signal.SIGKILL)
            except (OSError, AttributeError):  # AttributeError: no killpg (Windows)
                build.kill()
            build.wait()
        shutil.rmtree(folder, ignore_errors=True)


def whole(path: str) -> bool:
    """Whether ``path`` is a library these builds wrote whole: the hash beside it matches, and it is owned by
    this user (or root) and not writable by others (a library is code the loading process runs)."""
    sidecar = f"{path}.sha256"
    try:
        for name in (path, sidecar):  # regular files (not links), this user's or root's, written by no other
            st = os.lstat(name)
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in (os.getuid(), 0) or st.st_mode & 0o022:
                return False
        with open(sidecar) as f:
            recorded = f.read().strip()
    except (OSError, AttributeError, UnicodeDecodeError):  # AttributeError: no getuid (Windows)
        return False
    return recorded == digest(path)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _remove_stale(folder: str) -> None:
    """Removes what builds killed midway left (temporary files over an hour old)."""
    now = time.time()
    for name in os.listdir(folder):
        if ".so.tmp" in name:
            path = os.path.join(folder, name)
            try:
                if now - os.lstat(path).st_mtime > 3600:
                    os.unlink(path)
            except OSError:
                pass


def build(sources: list[str], target: str, compiler: list[str]) -> str | None:
    """Compiles ``sources`` into ``target``; returns None, or the compiler's complaint."""
    folder = os.path.dirname(target)
    try:
        os.makedirs(folder, exist_ok=True)
        _remove_stale(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    except OSError as e:
        raise OSError(f"cannot write to {folder}: {e}") from e
    os.close(fd)
    try:
        complaint = ""
        for flags in (FLAGS, tuple(f for f in FLAGS if f != "-march=native")):
            try:
                done = subprocess.run(
                    [*compiler, *flags, *sources, "-o", tmp],
                    capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
                )  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as e:
                return f"{' '.join(compiler)} could not be run: {e}"
            if done.returncode == 0:
                os.chmod(tmp, 0o755)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                _write_synced(tmp + ".sha256", digest(tmp).encode())
                os.chmod(tmp + ".sha256", 0o644)  # not the umask's: whole() refuses what others may write
                os.replace(tmp + ".sha256", target + ".sha256")
                os.replace(tmp, target)
                return None
            complaint = done.stderr.strip()[-400:] or f"it exited with {done.returncode} and printed nothing"
        names = ", ".join(os.path.basename(s) for s in sources)
        return f"{' '.join(compiler)} failed to build {names}: {complaint}"
    finally:
        for leftover in (tmp, tmp + ".sha256"):
            if os.path.exists(leftover):
                os.unlink(leftover)


if __name__ == "__main__":
    try:  # the lowest priority: the process that asked keeps working (on the torch path) meanwhile
        os.nice(19)
    except (AttributeError, OSError):
        pass
    try:
        problem = build(sys.argv[1].split(os.pathsep), sys.argv[2], sys.argv[3:])
    except OSError as e:  # the folder, the rename: nothing was built there
        print(e, file=sys.stderr)
        sys.exit(UNWRITABLE)
    if problem:
        print(problem, file=sys.stderr)
    sys.exit(1 if problem else 0)
