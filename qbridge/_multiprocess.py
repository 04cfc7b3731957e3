"""Loading under JAX's multi-controller runtime, tried on one machine.

:func:`check_multiprocess_load` starts N local processes, each of which joins a ``jax.distributed`` job
(coordinator on ``127.0.0.1``; CPU devices with cross-process gloo collectives, or one GPU per process),
loads checkpoints with ``sharding`` over a mesh of every process's devices, and checks each of its own
shards, byte for byte, against the same checkpoint loaded whole into host memory. It measures what
each process read from the files and its peak memory, can also convert to Orbax from all processes and
restore onto another sharding, and stops every process it started, within a time limit.

Each process runs ``python -m qbridge._process SPEC`` (the parent starts them so).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

RESULT = "QBRIDGE_PROCESS_RESULT "
# seconds the processes get to end once every one has printed its result (jax.distributed's shutdown),
# before those still running are stopped
SHUTDOWN_GRACE = 20.0


@dataclasses.dataclass
class ProcessReport:
    """What one process of :func:`check_multiprocess_load` found.

    Attributes:
        process_index: its ``jax.process_index()``.
        local_devices: its devices, as JAX names them.
        loads: one dict per checkpoint: ``checkpoint``, ``leaves``, ``shards`` (shards checked),
            ``mismatched`` (leaf names whose shards differ from the whole load: empty when all agree),
            ``read_bytes`` (bytes this process read from the files), ``stored_bytes`` (bytes the checkpoint
            stores for all leaves), ``share_bytes`` (the stored bytes of the parts of each leaf this process
            holds: its fair share), ``seconds`` (the sharded load), ``held_bytes`` (bytes of its shards) and
            ``peak_bytes`` (peak memory: resident set size on CPUs; on GPUs JAX's peak on its largest device
            so far plus torch's peak during this load).
        convert: for ``convert_dir``: ``out``, ``restored_shards`` checked and ``mismatched`` leaves after
            restoring onto another sharding; else None.
        mesh: the mesh the checkpoints were sharded over, in words.
    """

    process_index: int
    local_devices: list[str]
    loads: list[dict[str, Any]]
    convert: dict[str, Any] | None = None
    mesh: str = ""

    def __str__(self) -> str:
        lines = [f"process {self.process_index} ({', '.join(self.local_devices)}; mesh {self.mesh}):"]
        for load in self.loads:
            verdict = "equal" if not load["mismatched"] else f"DIFFER: {', '.join(load['mismatched'])}"
            lines.append(
                f"  {load['checkpoint']}: {load['shards']} shards of {load['leaves']} leaves {verdict}; read "
                f"{load['read_bytes'] / 1e6:.2f} MB (its share {load['share_bytes'] / 1e6:.2f} MB of "
                f"{load['stored_bytes'] / 1e6:.2f} MB stored) in {load['seconds']:.2f} s; its devices "
                f"hold {load['held_bytes'] / 1e6:.1f} MB (replicas each counted), peak memory {load['peak_bytes'] / 1e6:.0f} MB"
            )
        if self.convert:
            verdict = (
                "equal"
                if not self.convert["mismatched"]
                else f"DIFFER: {', '.join(self.convert['mismatched'])}"
            )
            lines.append(
                f"  wrote {self.convert['out']}; restored onto another sharding: "
                f"{self.convert['restored_shards']} shards {verdict}"
            )
        return "\n".join(lines)

    @property
    def ok(self) -> bool:
        """True when every shard, loaded and restored, equals the whole load."""
        return all(not load["mismatched"] for load in self.loads) and not (
            self.convert and self.convert["mismatched"]
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_multiprocess_load(
    checkpoints: Sequence[str | os.PathLike[str]],
    *,
    processes: int = 2,
    cpu_devices: int = 4,
    gpus: bool = False,
    mesh_shape: Sequence[int] | None = None,
    rules: Sequence[tuple[str, Sequence[Any]]] | None = None,
    convert_dir: str | os.PathLike[str] | None = None,
    timeout: float = 600.0,
) -> list[ProcessReport]:
    """Loads ``checkpoints`` sharded under ``jax.distributed`` in ``processes`` local processes and checks
    every shard against a whole load.

    A process that printed its result and then failed to end cleanly (XLA's coordination service can abort
    in ``jax.distributed.shutdown()`` while another process's requests are in flight), or is still ending
    ``SHUTDOWN_GRACE`` seconds after every process reported, has done its checks: they are returned, with a
    ``RuntimeWarning`` naming it and the end of its output.

    Args:
        checkpoints: checkpoint directories (or files) :func:`qbridge.load_checkpoint` reads.
        processes: how many processes to start (each is one JAX process, coordinator on 127.0.0.1).
        cpu_devices: CPU devices per process (ignored with ``gpus``).
        gpus: one GPU per process (process ``i`` sees GPU ``i`` only) instead of CPU devices.
        mesh_shape: the device mesh over all processes' devices: ``(n,)`` (axis ``"x"``) or ``(d, m)``
            (axes ``"data"``, ``"model"``); default ``(all devices,)``.
        rules: ``(regex, partition)`` pairs, a partition being a list of mesh axis names or None per
            leaf axis (as ``PartitionSpec`` takes them), searched against each leaf's dotted Flax name;
            default: every leaf of rank 2 or more is split along its last axis (``"x"``, or ``"model"``)
            and, on a 2-D mesh, along its first (``"data"``), where the sizes divide.
        convert_dir: also convert the first checkpoint to an Orbax checkpoint in this directory (shared
            by the processes) from all processes, restore it onto a different sharding and check it.
        timeout: seconds for the whole run; processes still running then are killed.

    Returns:
        One :class:`ProcessReport` per process, by process index.

    Raises:
        RuntimeError: a process failed before printing its result, or the time ran out; the message holds
            the end of each process's output. Every process started is gone when this returns or raises.
    """
    from jax.sharding import PartitionSpec

    import jax_side
    from jax_side._tree import warn_unmatched

    from ._checkpoint import open_checkpoint
    from ._loader import plan_load, unmatched_words
    from ._sharding import spec_problem

    if processes < 1 or cpu_devices < 1:
        raise ValueError(f"processes and cpu_devices must be positive, got {processes} and {cpu_devices}")
    per = 1 if gpus else cpu_devices
    total = processes * per
    shape = tuple(mesh_shape or (total,))
    if not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"mesh_shape {shape} must hold positive ints")
    if len(shape) not in (1, 2) or math.prod(shape) != total:
        raise ValueError(
            f"mesh shape {'x'.join(map(str, shape))} holds {math.prod(shape)} devices; {processes} processes x "
            f"{per} device(s) give {total}: use a 1-D or 2-D shape whose sizes multiply to {total}"
        )
    axes = ("x",) if len(shape) == 1 else ("data", "model")
    for pattern, partition in rules or ():
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"rule {pattern!r} is no regular expression: {e}") from e
        if isinstance(partition, str):
            raise TypeError(
                f"rule {pattern!r}: the partition is a list of axis names or None per leaf axis, got {partition!r}"
            )
        given = PartitionSpec(*(p if isinstance(p, str) or p is None else tuple(p) for p in partition))
        problem = spec_problem(given, axes)
        if problem:
            raise ValueError(
                f"rule {pattern!r}: {problem} (a 1-D mesh has axis 'x', a 2-D mesh 'data' and 'model')"
            )
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [checkpoints]
    for c in checkpoints:  # a bad path is reported here, once, not by every process
        with open_checkpoint(c) as ckpt:
            if rules:  # a rule that matches nothing is said here: the processes' own warnings are not shown
                _, plan, _, _ = plan_load(ckpt, None)
                names = [jax_side.dotted(p.leaf.path[1:]) for p in plan]
                warn_unmatched("sharding", [pattern for pattern, _ in rules], names, unmatched_words(names))
    if convert_dir is not None:
        pathlib.Path(convert_dir).mkdir(parents=True, exist_ok=True)
    spec = {
        "port": _free_port(),
        "processes": processes,
        "cpu_devices": cpu_devices,
        "gpus": gpus,
        "mesh_shape": list(shape),
        "rules": [[pattern, list(partition)] for pattern, partition in rules] if rules else None,
        "checkpoints": [str(pathlib.Path(c).absolute()) for c in checkpoints],
        "convert_dir": str(pathlib.Path(convert_dir).absolute()) if convert_dir else None,
    }
    with tempfile.TemporaryDirectory(prefix="qbridge-processes-") as logs:
        started = []
        for i in range(processes):
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join(flags)  # the CPU device count comes from ``cpu_devices``
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(i)
            else:
                env["JAX_PLATFORMS"] = "cpu"
            out = open(pathlib.Path(logs) / f"{i}.log", "w+")
            proc = subprocess.Popen(
                [sys.executable, "-m", "qbridge._process", json.dumps({**spec, "process_id": i})],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
            started.append((proc, out))
        deadline = time.monotonic() + timeout
        failed = False
        reported = [False] * processes  # whether each process has printed its result line
        all_reported_at = None
        stop = _stop_on_sigterm()  # a SIGTERM ends this call through the finally below, not around it
        try:
            while any(p.poll() is None for p, _ in started):
                reported = [r or _reported(out) for r, (_, out) in zip(reported, started)]
                # a process that failed before reporting fails the run; one that reported and then ended
                # otherwise (an abort in jax.distributed's shutdown) has done its work
                if time.monotonic() > deadline or any(
                    p.poll() not in (None, 0) and not r for (p, _), r in zip(started, reported)
                ):
                    failed = True
                    break
                if all(reported):  # every check done: the others get a few seconds to end their shutdown
                    all_reported_at = all_reported_at or time.monotonic()
                    if time.monotonic() - all_reported_at > SHUTDOWN_GRACE:
                        break
                time.sleep(0.2)
        finally:
            for proc, _ in started:  # the others would wait for the failed one at a barrier
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            stop()
        texts = []
        for _, out in started:
            out.seek(0)
            texts.append(out.read())
            out.close()
    reported = [RESULT in text for text in texts]
    if failed or any(p.returncode != 0 and not r for (p, _), r in zip(started, reported)):
        tails = "\n".join(
            f"--- process {i} (exit {p.returncode}) ---\n{_tail(text)}"
            for i, ((p, _), text) in enumerate(zip(started, texts))
        )
        if time.monotonic() > deadline:
            why = f"ran past the time limit of {timeout:g} s"
        else:
            bad = [i for i, (p, _) in enumerate(started) if p.returncode not in (0, -signal.SIGKILL)]
            why = f"process {', '.join(map(str, bad))} failed" if bad else "failed"
        raise RuntimeError(f"the {processes}-process load {why} (each process's output ends below):\n{tails}")
    reports = []
    for i, text in enumerate(texts):
        line = next((ln for ln in text.splitlines() if ln.startswith(RESULT)), None)
        if line is None:
            raise RuntimeError(f"process {i} printed no result:\n{text[-4000:]}")
        reports.append(ProcessReport(**json.loads(line[len(RESULT) :])))
    ended = [(i, p.returncode) for i, (p, _) in enumerate(started) if p.returncode != 0]
    if ended:  # after its result: its checks stand
        warnings.warn(
            "; ".join(
                f"process {i} reported its result, then "
                + (f"was stopped after {SHUTDOWN_GRACE:g} s" if code == -signal.SIGKILL else f"exited {code}")
                + " while ending jax.distributed"
                for i, code in ended
            )
            + f" (its output ends: {_tail(texts[ended[0][0]])[-600:]!r})",
            RuntimeWarning,
            stacklevel=2,
        )
    return sorted(reports, key=lambda r: r.process_index)


def _reported(out: Any) -> bool:
    """Whether a process's output file holds its result line yet."""
    with open(out.name) as f:
        return RESULT in f.read()


def _stop_on_sigterm() -> Any:
    """Makes SIGTERM raise ``SystemExit`` in this (main) thread while processes run; returns the undo."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _tail(text: str) -> str:
    """The end of a process's output: its traceback when it has one (import messages of other packages
    before it are left out)."""
    start = text.rfind("Traceback (most recent call last)")
    return text[start:][-6000:] if start >= 0 else text[-4000:]


def _sharding_fn(mesh: Any, rules: list[list[Any]] | None) -> Any:
    from jax.sharding import NamedSharding, PartitionSpec

    if rules:
        return (mesh, [(pattern, PartitionSpec(*partition)) for pattern, partition in rules])
    names = mesh.axis_names
    sizes = [mesh.shape[n] for n in names]

    def spread(name: str, shape: tuple[int, ...]) -> Any:
        parts: list[Any] = [None] * len(shape)
        if len(shape) >= 2:
            last = names[-1]
            if shape[-1] % sizes[-1] == 0:
                parts[-1] = last
            if len(names) == 2 and shape[0] % sizes[0] == 0:
                parts[0] = names[0]
        return NamedSharding(mesh, PartitionSpec(*parts))

    return spread


def _other_sharding(mesh: Any, shape: tuple[int, ...]) -> Any:
    """A sharding unlike the default one: the first axis split over every device where it divides."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    flat = Mesh(np.array(mesh.devices).reshape(-1), ("all",))
    parts: list[Any] = [None] * len(shape)
    if shape and shape[0] % flat.size == 0:
        parts[0] = "all"
    return NamedSharding(flat, PartitionSpec(*parts))


def _leaves(tree: Any) -> dict[str, Any]:
    import jax

    import jax_side

    return {
        jax_side.dotted(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)): v
        for path, v in jax.tree_util.tree_leaves_with_path(tree)
    }


def _compare_shards(got: dict[str, Any], want: dict[str, Any]) -> tuple[int, list[str]]:
    """Shards checked, and the leaves of ``got`` whose shards differ from ``want`` (or that it lacks)."""
    shards, mismatched = 0, []
    for name, array in got.items():
        if name not in want:
            mismatched.append(name)
            continue
        checked, differ = _shards_differ(array, want[name])
        shards += checked
        if differ:
            mismatched.append(name)
    return shards, mismatched


def _shards_differ(sharded: Any, whole: Any) -> tuple[int, bool]:
    import numpy as np

    reference = np.asarray(whole)
    checked, differ = 0, False
    for shard in sharded.addressable_shards:
        got = np.asarray(shard.data)
        want = reference[shard.index]
        checked += 1
        differ |= got.shape != want.shape or got.dtype != want.dtype or got.tobytes() != want.tobytes()
    return checked, differ


def _reset_peaks(gpus: bool) -> None:
    if gpus:
        import torch

        torch.cuda.reset_peak_memory_stats()


def _peak_bytes(gpus: bool) -> int:
    """On GPUs, JAX's peak bytes on the process's largest device plus torch's peak since the last reset
    (two allocators: an upper bound on the card's peak); on CPUs the peak resident set size."""
    if gpus:
        import jax
        import torch

        jax_peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.local_devices())
        return int(jax_peak + torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _held_bytes(tree: Any) -> int:
    """Bytes of the process's own shards of ``tree`` (what its devices hold once the load returns)."""
    import jax

    return sum(s.data.nbytes for x in jax.tree_util.tree_leaves(tree) for s in x.addressable_shards)


def _share(ckpt_path: str, sharded: dict[str, Any]) -> tuple[int, int]:
    """Stored bytes of all leaves, and of the parts of each leaf this process holds."""
    import jax_side

    from ._checkpoint import open_checkpoint
    from ._loader import plan_load

    stored = share = 0
    with open_checkpoint(ckpt_path) as ckpt:
        _, plan, _, _ = plan_load(ckpt, None, dtype=None, kinds=None, rename=None, strict=True)
        for p in plan:
            entry = ckpt.entries[p.key]
            leaf = sharded[jax_side.dotted(p.leaf.path)]
            size = math.prod(leaf.shape) or 1
            held = {repr(s.index): math.prod(s.data.shape) for s in leaf.addressable_shards}
            stored += entry.stored_bytes
            share += entry.stored_bytes * min(1.0, sum(held.values()) / size)
    return stored, int(share)


def run_process(spec: dict[str, Any]) -> None:
    import jax

    if not spec["gpus"]:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", spec["cpu_devices"])
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{spec['port']}",
        num_processes=spec["processes"],
        process_id=spec["process_id"],
    )
    import numpy as np
    from jax.sharding import Mesh

    from ._convert import convert_checkpoint, restore_converted
    from ._loader import load_checkpoint

    shape = tuple(spec["mesh_shape"])
    mesh = Mesh(np.array(jax.devices()).reshape(shape), ("x",) if len(shape) == 1 else ("data", "model"))
    sharding = _sharding_fn(mesh, spec["rules"])
    home = jax.local_devices(backend="cpu")[0]  # the reference load: host memory, devices untouched
    loads = []
    first_whole = None  # the first checkpoint's reference, kept for the conversion
    for path in spec["checkpoints"]:
        _reset_peaks(spec["gpus"])
        start = time.perf_counter()
        sharded, report = load_checkpoint(path, sharding=sharding, progress=False, return_report=True)
        seconds = time.perf_counter() - start
        peak, held = _peak_bytes(spec["gpus"]), _held_bytes(sharded)
        whole = load_checkpoint(path, device=home, progress=False)  # the reference, after the measurement
        if first_whole is None:
            first_whole = whole
        got = _leaves(sharded)
        shards, mismatched = _compare_shards(got, _leaves(whole))
        stored, share = _share(path, got)
        loads.append({
            "checkpoint": path, "leaves": len(got), "shards": shards, "mismatched": mismatched,
            "read_bytes": report.read_bytes, "stored_bytes": stored, "share_bytes": share,
            "seconds": seconds, "peak_bytes": peak, "held_bytes": held,
        })  # fmt: skip
        del sharded, got, whole
    convert = None
    if spec["convert_dir"]:
        path = spec["checkpoints"][0]
        out = pathlib.Path(spec["convert_dir"]) / (
            re.sub(r"[^\w.-]", "_", pathlib.Path(path).name) + ".orbax"
        )
        convert_checkpoint(path, out, sharding=sharding, progress=False, overwrite=True)
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=_other_sharding(mesh, x.shape)),
            first_whole,
        )
        restored = _leaves(restore_converted(out, target))
        shards, mismatched = _compare_shards(restored, _leaves(first_whole))
        mismatched += [
            n
            for n, a in restored.items()
            if n not in mismatched and a.sharding != _other_sharding(mesh, a.shape)
        ]
        convert = {"out": str(out), "restored_shards": shards, "mismatched": mismatched}
    names = ", ".join(f"{n}={s}" for n, s in mesh.shape.items())
    result = ProcessReport(jax.process_index(), [str(d) for d in jax.local_devices()], loads, convert, names)
    print(RESULT + json.dumps(dataclasses.asdict(result)), flush=True)
    jax.distributed.shutdown()
