"""``convert_checkpoint``: a quantized PyTorch checkpoint to an Orbax checkpoint of Flax parameters, atomically."""

from __future__ import annotations

import functools
import glob
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

import jax_side
from jax_side._quantized import from_pieces, meta_fields
from jax_side._target import kept_in, kept_said
from jax_side._tree import dotted

from ._errors import CheckpointError, first_line
from ._loader import LoadReport, load_checkpoint


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - orbax comes with flax
        raise ImportError("convert needs orbax-checkpoint: pip install 'qbridge[flax]'") from e
    return ocp


def convert_checkpoint(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    target: Any = None,
    device: Any = None,
    dtype: Any = None,
    strict: bool = True,
    kinds: Mapping[str, str] | None = None,
    rename: Mapping[str, str] | None = None,
    sharding: Any = None,
    keep_quantized: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> LoadReport:
    """Loads ``path`` with :func:`qbridge.load_checkpoint` and writes the parameters to ``out`` as an Orbax
    checkpoint (``orbax.checkpoint.StandardCheckpointer``), all or nothing.

    The checkpoint is written to a hidden sibling directory (``.OUT.partial-*``) and renamed into place only
    when complete (an ``out`` that ``overwrite`` replaces is first renamed to ``.OUT.replaced-*``, and once
    the new one is in place to ``.OUT.removing-*`` and removed): an interrupted or failed conversion leaves no
    new ``out`` and removes its partial files. What a killed one left, the next conversion to ``out`` puts
    right where the killed process ran on the same machine, container and boot: an ``out`` it had moved aside
    and not replaced is renamed back (with a warning), and its partial files and a replaced ``out`` it was
    removing are removed; partial files of others are left and named in a warning.
    Read it back with :func:`restore_converted`, which gives the tree :func:`qbridge.load_checkpoint` returns
    (a plain ``orbax.checkpoint.StandardCheckpointer().restore`` gives the integer keys of layer lists as
    strings, which ``nnx.update`` refuses, and kept-quantized weights as loose pieces).

    Under ``jax.distributed`` every process calls it with the same arguments: with ``sharding`` each
    process reads and decodes only its own shards (see :func:`qbridge.load_checkpoint`) and writes them
    through Orbax's multi-process save; process 0 moves the finished checkpoint into place after every
    process has written, and every process returns only after that. ``out`` must be on a file system all
    processes share.

    Args:
        path: the PyTorch checkpoint (any format ``load_checkpoint`` reads).
        out: the Orbax checkpoint directory to create.
        target: the Flax target to lay the parameters out for, as for :func:`qbridge.load_checkpoint`; to
            name one in words (``"llama"``, a Flax class by import path) use :func:`qbridge.build_target`.
        device: where the parameters are made before writing, as for :func:`qbridge.load_checkpoint`.
        dtype: the dtype rule or cast, as for :func:`qbridge.load_checkpoint`.
        strict: refuse a checkpoint that does not fit ``target`` (as for :func:`qbridge.load_checkpoint`).
        kinds: regex -> torch module kind overrides, as for :func:`qbridge.load_checkpoint`.
        rename: regex -> replacement for checkpoint keys, as for :func:`qbridge.load_checkpoint`.
        sharding: shard the parameters as :func:`qbridge.load_checkpoint` does; each process writes its
            own shards.
        keep_quantized: write 4-bit and FP8 kernels kept quantized (their stored pieces, and beside them
            their other fields): :func:`restore_converted` gives them back as ``NF4Weight`` / ``FP8Weight``.
        progress: show a progress bar while loading.
        overwrite: replace an existing Orbax checkpoint at ``out`` (only after the new one is complete).

    Returns:
        The :class:`LoadReport` of the load.

    Raises:
        ValueError: ``out`` is empty, or a link that leads nowhere (a link that leads somewhere is followed:
            the checkpoint is written there).
        FileExistsError: ``out`` exists and ``overwrite`` is False, or it is no Orbax checkpoint (only those
            are replaced), or it is or holds the checkpoint being converted.
        CheckpointError: from loading (a damaged or unreadable checkpoint); nothing is written then.
        FormatError: from loading (an unknown or mixed format); nothing is written then.
        jax_side.MatchError: from matching to ``target``; nothing is written then.
    """
    ocp = _orbax()
    if not os.fspath(out):
        raise ValueError("out is empty: name the Orbax checkpoint directory to create")
    out = pathlib.Path(out).absolute()
    _restore_replaced(pathlib.Path(os.path.realpath(out)))
    if out.is_symlink():  # written where the link leads (the link then leads to the new checkpoint)
        try:
            out = out.resolve(strict=True)
        except (OSError, RuntimeError) as e:  # nowhere, or a loop of links
            why = (
                "a loop of links"
                if isinstance(e, RuntimeError) or "loop" in str(e).lower()
                else "which does not exist"
            )
            raise ValueError(
                f"{out} is a link to {os.readlink(out)}, {why}: name the directory to create"
            ) from None
    source = pathlib.Path(path).absolute().resolve()
    if source == out.resolve() or source.is_relative_to(out.resolve()):
        raise FileExistsError(
            f"{out} holds the checkpoint being converted ({path}); write the Orbax checkpoint elsewhere"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out} exists; pass overwrite=True (on the command line: --overwrite) to replace it"
        )
    if out.exists() and not (out / "_CHECKPOINT_METADATA").exists():
        raise FileExistsError(
            f"{out} exists and is no Orbax checkpoint; overwrite replaces only one (remove it yourself)"
        )
    if not out.parent.is_dir():
        what = "a file, not a directory" if out.parent.exists() else "no such directory"
        raise CheckpointError(f"{out.parent}: {what} to write the converted checkpoint in")
    params, report = load_checkpoint(
        path, target=target, device=device, dtype=dtype, strict=strict, kinds=kinds, rename=rename, sharding=sharding,
        keep_quantized=keep_quantized, progress=progress, return_report=True,
    )  # fmt: skip
    token = _shared_token()  # one name for the partial directory in every process
    partial = out.parent / f".{out.name}.partial-{token}"
    primary = jax.process_index() == 0
    if primary:
        _remove_abandoned(out)
    try:
        if primary:  # who writes it: a later conversion removes it if this process dies before it does
            partial.mkdir()
            (partial / _OWNER).write_text(json.dumps(_owner()))
        _barrier(f"qbridge-convert-partial-{token}")
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(partial / "state", params)
        checkpointer.wait_until_finished()
        if primary:
            _write_quantized_fields(params, partial / "state" / QUANTIZED_FIELDS)
        _barrier(f"qbridge-convert-written-{token}")
        if primary:
            if out.exists():
                # named as the partial directory, whose owner record says whether its process still runs
                retired = out.parent / f".{out.name}.replaced-{token}"
                os.replace(out, retired)
                os.replace(partial / "state", out)
                removing = out.parent / f".{out.name}.removing-{token}"  # superseded: anyone may remove it
                os.replace(retired, removing)
                shutil.rmtree(removing, ignore_errors=True)
            else:
                os.replace(partial / "state", out)
        _barrier(f"qbridge-convert-in-place-{token}")
    finally:
        if primary:
            shutil.rmtree(partial, ignore_errors=True)
    return report


_OWNER = "qbridge-owner.json"  # in a partial directory: where and by which process it is written


def _owner() -> dict[str, Any]:
    """Who writes a partial directory: where (:func:`_place`) and the process id."""
    return {**_place(), "pid": os.getpid()}


@functools.cache
def _place() -> dict[str, Any]:
    """Where this process runs: the host name, the boot (Linux's ``boot_id``) and the process-id namespace,
    which together say whether a process id means the same process here. Containers may share a host name
    (and a volume) with each other, not their boot and namespace both."""

    def read(path: str) -> str | None:
        try:
            return pathlib.Path(path).read_text().strip()
        except OSError:
            return None

    try:
        pid_namespace: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        pid_namespace = None
    return {
        "host": socket.gethostname(),
        "boot": read("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": pid_namespace,
    }


def _moved_aside(out: pathlib.Path) -> list[tuple[pathlib.Path, pathlib.Path]]:
    """Each ``.OUT.replaced-TOKEN`` beside ``out`` (an ``out`` an overwrite moved aside), with the partial
    directory of that conversion (``.OUT.partial-TOKEN``, whose owner record says whether it runs)."""
    prefix = f".{out.name}.replaced-"
    return [
        (aside, out.parent / f".{out.name}.partial-{aside.name.removeprefix(prefix)}")
        for aside in sorted(out.parent.glob(f"{glob.escape(prefix)}*"))
    ]


def _restore_replaced(out: pathlib.Path) -> None:
    """Where no ``out`` is, renames back the ``out`` an overwrite had moved aside (``.OUT.replaced-TOKEN``) and
    died before moving the new one in, with a warning: the overwrite did not happen. Only where the
    conversion's process (its partial directory's owner) ran here and runs no more."""
    if out.exists() or out.is_symlink():
        return
    for aside, partial in _moved_aside(out):
        if _owner_state(partial) != "ended":
            continue
        try:
            os.replace(aside, out)
        except OSError:  # another process of this job, or another conversion, got there first
            return
        warnings.warn(
            f"{out}: restored from {aside.name}, where an overwrite that did not finish (killed) had moved it "
            "aside",
            stacklevel=3,
        )
        return


def _owner_state(partial: pathlib.Path) -> str:
    """``"ended"`` where the conversion writing ``partial`` ran on this machine, container and boot and runs
    no more, ``"running"`` where it runs, ``"unknown"`` elsewhere (another place, no or a bad owner record)."""
    try:
        owner = json.loads((partial / _OWNER).read_text())
        same_place, pid = all(owner[key] == value for key, value in _place().items()), int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
    if not same_place or pid <= 0:
        return "unknown"
    return "running" if _running(pid) else "ended"


def _remove_abandoned(out: pathlib.Path) -> None:
    """Removes the partial directories of conversions to ``out`` whose process died on this host before
    removing them (killed, out of memory), and earlier checkpoints an overwrite replaced and died while
    removing (``.OUT.removing-*``); warns naming those whose owner is not known (another host,
    container or boot, no owner file) and is not known to run. Those of a process that runs are left alone."""
    for superseded in out.parent.glob(f".{glob.escape(out.name)}.removing-*"):
        shutil.rmtree(superseded, ignore_errors=True)
    unknown = []
    for partial in sorted(out.parent.glob(f".{glob.escape(out.name)}.partial-*")):
        state = _owner_state(partial)
        if state == "ended":
            shutil.rmtree(partial, ignore_errors=True)
        elif state == "unknown":
            unknown.append(partial.name)
    for aside, partial in _moved_aside(out):
        if _owner_state(partial) != "running":
            warnings.warn(
                f"{aside}: {out.name} as it was before an overwrite that did not finish; {out.name} was written "
                "since: remove it, or rename it back to keep it",
                stacklevel=3,
            )
    if unknown:
        warnings.warn(
            f"{out.parent}: {', '.join(unknown[:3])}{f' (and {len(unknown) - 3} more)' if len(unknown) > 3 else ''}"
            f": partial files of a conversion to {out.name} by another machine, container or boot, or an older "
            f"qbridge; remove them if no conversion to {out.name} is running",
            stacklevel=3,
        )


def _running(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (one that is not ours to signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def _shared_token() -> str:
    """A random token, the same in every process of a ``jax.distributed`` job (process 0's)."""
    value = np.array([secrets.randbits(31), secrets.randbits(31)], dtype=np.int32)  # int32: fits with x64 off
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        value = multihost_utils.broadcast_one_to_all(value)
    return "".join(f"{int(v):08x}" for v in np.asarray(value))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# files an Orbax checkpoint directory holds (one of them is enough to tell it from another directory)
_ORBAX_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "commit_success.txt")


def restore_converted(out: str | os.PathLike[str], target: Any = None) -> Any:
    """The parameters of a checkpoint written by :func:`convert_checkpoint`.

    Args:
        out: the Orbax checkpoint directory.
        target: None (arrays as saved, on the devices they were saved from), an nnx model or
            ``nnx.State`` (for a checkpoint written from one, its pure dict), or a pytree of the same
            structure whose leaves are ``jax.ShapeDtypeStruct`` (with a ``sharding``) or arrays: each leaf
            is restored with that leaf's sharding and dtype, so a checkpoint saved on one mesh can be
            read onto another (under ``jax.distributed`` each process reads its own shards). Without a
            target the arrays go back onto the devices they were saved from, so a checkpoint written by
            several processes needs a target to be read by one.

    Returns:
        The parameter pytree: new arrays, aliasing nothing. Without a target, dictionaries keyed by ints
        when written (an nnx model's layer numbers) are keyed by ints again, so the tree goes back into the
        model (``nnx.update``, ``jax_side.load_quantized_into_nnx``); weights written kept quantized come
        back as :class:`jax_side.NF4Weight` / :class:`jax_side.FP8Weight` with their recorded fields. With a
        target, a kept weight's fields that are no arrays (``dtype``, ``decode_dtype`` ...) are the
        target's; a ``UserWarning`` names the first weight where they differ from the record.

    Raises:
        CheckpointError: ``out`` is not an Orbax checkpoint, or one written from other devices without a
            target; an array of it cannot be read (a data file cut short or removed: the array is named); the
            checkpoint's record of kept-quantized weights does not fit its arrays; the target's tree is not
            the checkpoint's (the leaves either lacks and the shapes that differ are named); an nnx target for
            kept-quantized weights.
    """
    path = pathlib.Path(out).absolute()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such directory" + (" (a file)" if path.exists() else ""))
    if target is None:
        try:
            restored = _orbax().StandardCheckpointer().restore(path)
        except (FileNotFoundError, ValueError, KeyError) as e:
            if "topology mismatch" in str(e).lower():
                raise CheckpointError(
                    f"{path}: written from another set of devices than this process has (Orbax: "
                    f"{first_line(e)}); pass a target: restore_converted(out, target), the model or a tree of "
                    "jax.ShapeDtypeStruct with the shardings to read it onto"
                ) from e
            if any((path / name).exists() for name in _ORBAX_FILES):
                raise CheckpointError(
                    f"{path}: the Orbax checkpoint there is damaged or incomplete (Orbax: {first_line(e)}); "
                    "convert it again"
                ) from e
            raise CheckpointError(
                f"{path}: not a checkpoint written by convert_checkpoint (Orbax: {first_line(e)}); a PyTorch "
                "checkpoint loads with load_checkpoint"
            ) from e
        except Exception as e:  # TensorStore's read of a damaged array: a bare Exception, its cause says what
            raise _damaged(path, e) from e
        return _read_quantized_fields(restored, path / QUANTIZED_FIELDS)
    tree = _as_tree(target, path)
    leaves = _leaf_shapes(path, tree)
    if leaves is not None and any(leaves[0][k] != leaves[1][k] for k in leaves[0].keys() & leaves[1].keys()):
        # a shape that differs, told from the record before any array is read: Orbax, finding it while
        # reading, leaves its reads of the other arrays to fail later, with hundreds of lines of tracebacks
        # on stderr. Leaves one side lacks are left to Orbax (a None in the target skips that array)
        raise _not_the_tree(path, _leaves_differ(*leaves))
    try:
        restored = _orbax().StandardCheckpointer().restore(path, tree)
    except (ValueError, TypeError, KeyError, AssertionError) as e:
        said = f"{type(e).__name__}: {first_line(e)}"
        if leaves is None:  # no record to compare with: Orbax's own words
            how = said
        elif leaves[0] == leaves[1]:  # the same leaves by name and shape: a guess, Orbax's words beside it
            how = (
                "the same arrays by name and shape, in other containers: a list where the checkpoint holds a "
                "dict keyed by numbers, say; give the tree as it was written, or restore without a target "
                f"(Orbax: {said})"
            )
        else:
            how = _leaves_differ(*leaves)
        raise _not_the_tree(path, how) from e
    except Exception as e:  # as above
        raise _damaged(path, e) from e
    _warn_if_fields_differ(restored, path / QUANTIZED_FIELDS)
    return restored


def _not_the_tree(path: pathlib.Path, how: str) -> CheckpointError:
    """The error for a target whose tree is not the checkpoint's (``how``: in what)."""
    return CheckpointError(
        f"{path}: the target's tree does not match the checkpoint's ({how}). A checkpoint written without a "
        "target holds {'params': {...}} with Flax names and restores without one (restore_converted(out)); "
        "one written from a target (qbridge convert --target llama) restores onto that target: the model, "
        "nnx.state(model), or the same tree of arrays or ShapeDtypeStructs"
    )


def _leaf_shapes(
    path: pathlib.Path, tree: Any
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]] | None:
    """The checkpoint's recorded arrays and ``tree``'s leaves, each as ``{dotted path: shape}``; None if the
    record cannot be read (an older Orbax, a damaged record: Orbax's restore then says what it finds)."""

    def name(keypath: Any) -> str:
        return dotted(tuple(_key(k) for k in keypath))

    try:
        meta = _orbax().StandardCheckpointer().metadata(path)
        stored = {name(p): tuple(m.shape) for p, m in
                  jax.tree_util.tree_leaves_with_path(getattr(meta, "item_metadata", meta)) if hasattr(m, "shape")}  # fmt: skip
        wanted = {name(p): _recorded_shape(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    except Exception:
        return None
    return stored, wanted


def _recorded_shape(x: Any) -> tuple[int, ...]:
    """The shape Orbax records for a target leaf: its own, or a typed PRNG key's ``key_data`` shape."""
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return tuple(jax.eval_shape(jax.random.key_data, x).shape)
    return tuple(np.shape(x))


def _leaves_differ(
    stored: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]], most: int = 6
) -> str:
    """Which leaves ``wanted`` (the target's) and ``stored`` (the checkpoint's) name apart, and the shapes in
    which their common leaves differ; ``{dotted path: shape}`` each, not equal."""

    def listed(names: list[str]) -> str:
        return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")

    parts = []
    if lacking := sorted(wanted.keys() - stored.keys()):
        parts.append(f"the checkpoint has no {listed(lacking)}")
    if extra := sorted(stored.keys() - wanted.keys()):
        parts.append(f"the target has no {listed(extra)}")
    if shapes := [f"{k} {stored[k]} stored, {wanted[k]} in the target" for k in sorted(stored.keys() & wanted.keys())
                  if stored[k] != wanted[k]]:  # fmt: skip
        parts.append(f"shapes differ: {listed(shapes)}")
    return "; ".join(parts)  # not empty: the two differ


def _damaged(path: pathlib.Path, e: Exception) -> Exception:
    """The error for an Orbax restore that failed reading an array (a data file cut short or removed):
    a CheckpointError naming the leaf when TensorStore's error says which; ``e`` itself otherwise."""
    said = f"{e}\n{e.__cause__ or ''}"
    leaf = re.search(r'Error reading "([^"/]+)/', said) or re.search(r"'path': '([^'/]+)/'", said)
    if "Encountered error while reading" not in said and leaf is None:
        return e
    cause = first_line(e.__cause__) if e.__cause__ is not None else first_line(e)
    return CheckpointError(
        f"{path}: the Orbax checkpoint there is damaged: reading "
        + (f"the array {leaf.group(1)!r}" if leaf else "an array")
        + f" failed ({cause}); convert it again"
    )


def _as_tree(target: Any, path: pathlib.Path) -> Any:
    """A target as the tree the checkpoint was written from: an nnx model or state as its pure dict (what
    ``load_checkpoint(..., target=model)`` returns and ``convert_checkpoint`` writes)."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is an extra
        return target
    if not isinstance(target, (nnx.Module, nnx.State)):
        return target
    kept = kept_in(target)
    if kept:
        raise CheckpointError(
            f"{path}: the target's {kept_said(kept)} (jax_side.load_quantized_into_nnx put it in); restore onto "
            "a model built afresh, or restore without a target and put the result in with "
            "jax_side.load_quantized_into_nnx (a checkpoint converted with keep_quantized=True)"
        )
    if _kept_weights(path / QUANTIZED_FIELDS):
        raise CheckpointError(
            f"{path}: holds kept-quantized weights, which an nnx model's dense kernels cannot receive: restore it "
            "without a target, then jax_side.load_quantized_into_nnx(model, params)"
        )
    return nnx.to_pure_dict(nnx.state(target) if isinstance(target, nnx.Module) else target)


def _kept_weights(file: pathlib.Path) -> bool:
    """Whether the record beside a written checkpoint lists kept-quantized weights."""
    try:
        return bool(json.loads(file.read_text()).get("weights"))
    except (OSError, ValueError, AttributeError):
        return False


# Beside the arrays, a written checkpoint records each kept-quantized weight's fields that are no arrays
# (shape, blocksize, quant_type, dtype ...): Orbax stores arrays only, and without them the pieces restored
# without a target could not be made a weight again.
QUANTIZED_FIELDS = "qbridge_quantized.json"


def _key(k: Any) -> str | int:
    return (
        k.idx if isinstance(k, jax.tree_util.SequenceKey) else str(getattr(k, "key", getattr(k, "name", k)))
    )


def _write_quantized_fields(params: Any, file: pathlib.Path) -> None:
    """Writes the record beside the arrays: each kept weight's fields, and the dictionaries keyed by ints
    (Orbax writes every key as a string)."""
    kept = [
        {"path": [_key(k) for k in path], "type": type(leaf).__name__, "fields": meta_fields(leaf)}
        for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=jax_side.is_quantized)[0]
        if jax_side.is_quantized(leaf)
    ]
    int_keys = _int_keys(params, [])
    if kept or int_keys:
        file.write_text(json.dumps({"format": 1, "weights": kept, "int_keys": int_keys}))


def _int_keys(node: Any, path: list[str | int]) -> list[dict[str, Any]]:
    """``[{"path": [...], "keys": [ints]}]`` for every dictionary in ``node`` with int keys."""
    found: list[dict[str, Any]] = []
    if isinstance(node, Mapping):
        ints = [k for k in node if isinstance(k, int) and not isinstance(k, bool)]
        if ints:
            found.append({"path": path, "keys": ints})
        for k, v in node.items():
            found += _int_keys(v, [*path, k if isinstance(k, int) else str(k)])
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            found += _int_keys(v, [*path, i])
    return found


def _decoding(fields: dict[str, Any]) -> dict[str, Any]:
    """A weight's recorded fields as they decide its decoding (a ``decode_dtype`` equal to ``dtype`` is
    none)."""
    out = dict(fields)
    if out.get("decode_dtype") in (None, out.get("dtype")):
        out.pop("decode_dtype", None)
    return out


def _warn_if_fields_differ(tree: Any, file: pathlib.Path) -> None:
    if not file.exists():
        return
    try:
        recorded = {tuple(map(str, w["path"])): w["fields"] for w in json.loads(file.read_text())["weights"]}
    except (KeyError, TypeError, ValueError):
        return  # restoring with a target does not read the record: nothing to compare with
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=jax_side.is_quantized)[0]:
        if not jax_side.is_quantized(leaf):
            continue
        where = tuple(str(_key(k)) for k in path)
        fields = recorded.get(where)
        if fields is not None and _decoding(fields) != _decoding(meta_fields(leaf)):
            warnings.warn(
                f"{file.parent}: the kept weight at {'/'.join(where)} is restored with the target's fields "
                f"{meta_fields(leaf)}, and was written with {fields}; it decodes as the target says",
                stacklevel=3,
            )
            return


def _at(tree: Any, path: list[Any]) -> Any:
    """The node at a recorded ``path`` of a tree as Orbax restores it (dictionary keys as strings)."""
    for k in path:
        tree = tree[k if isinstance(tree, list) else str(k)]
    return tree


def _read_quantized_fields(tree: Any, file: pathlib.Path) -> Any:
    if not file.exists():
        return tree
    where = ""
    try:
        doc = json.loads(file.read_text())
        version = doc.get("format")
        if type(version) is not int or version != 1:
            newer = type(version) is int and version > 1
            raise CheckpointError(
                f"{file}: a record of kept-quantized weights in format {version!r}"
                + (", written by a newer qbridge" if newer else "")
                + " (this one reads format 1)"
                + ("; restore it with that version" if newer else "")
            )
        for entry in doc["weights"]:
            where = f" at {'/'.join(str(k) for k in entry.get('path', []))}"
            *parents, last = entry["path"]
            node = _at(tree, parents)
            key = last if isinstance(node, list) else str(last)
            node[key] = from_pieces(entry["type"], node[key], entry["fields"])
        where = ""
        for entry in sorted(doc.get("int_keys", []), key=lambda e: -len(e["path"])):  # innermost first
            node = _at(tree, entry["path"])
            numbered = {int(k): node.pop(str(k)) for k in sorted(entry["keys"])}
            rest = dict(node)
            node.clear()
            node.update(numbered)
            node.update(rest)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{file}: the record of kept-quantized weights does not fit the checkpoint{where} "
            f"({type(e).__name__}: {e})"
        ) from e
    return tree
