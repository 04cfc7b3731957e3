"""Layer-by-layer parity: where a Flax port and its torch original part ways.

Both models run on the same inputs. Every submodule's input and output is captured on both sides (torch
forward hooks; flax.nnx by wrapping each submodule class's ``__call__`` for the duration of the run; linen
with ``nn.intercept_methods``), the two sides are paired by module path through the loader's name mapping
(``model.layers.3.mlp.down_proj`` is ``("model", "layers", 3, "mlp", "down_proj")`` in nnx and
``model/layers_3/mlp/down_proj`` in linen; ``rename=`` maps torch names the way ``load_checkpoint``'s does),
and each pair is compared with :func:`qbridge.parity.compare`'s dtype-aware tolerances.

The first divergence is the module where the difference starts: its input agrees on both sides and its
output does not, and every submodule it called with agreeing inputs agrees too. So a transposed kernel
points at that Linear, a wrong epsilon at that norm, and an error in an attention block's own code
(rotary halves, softmax precision) at the attention block rather than at the projection after it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

_NUMBERED = re.compile(r"^(.*)_(\d+)$")


@dataclasses.dataclass
class TracePair:
    """One module seen from both sides: its torch name and Flax path, how its input and output compare.

    ``shape`` is the torch output's; ``flax_shape`` is None where the Flax output has that shape (after moving
    a convolution's channels-last axis, or reshaping heads split into an axis of their own), else the Flax
    output's shape, and the pair fails (``max_abs`` and ``max_rel`` inf, ``cosine`` NaN): a port that
    returns, say, hidden states where torch returns logits, or ``[batch, vocab, seq]`` where torch returns
    ``[batch, seq, vocab]``."""

    name: str
    flax_path: str
    shape: tuple[int, ...]
    dtype: str
    max_abs: float
    max_rel: float
    cosine: float
    ok: bool
    input_ok: bool
    order: int
    flax_shape: tuple[int, ...] | None = None  # the Flax output's shape where it is not torch's: failed


@dataclasses.dataclass
class TraceReport:
    """Per-module parity in execution order (each module when its call ends).

    Attributes:
        pairs: the paired modules, in the order their calls ended on the torch side.
        first_divergence: the torch name of the module where the two models part ways (see the module
            docstring), or None when every pair agrees. The model itself is named ``""`` (torch's name for
            it, printed as ``(model)``): test with ``is None``, or use :attr:`ok`.
        unpaired_torch: torch modules called whose Flax counterpart was not (none of that name, or one
            the port did not call).
        unpaired_flax: Flax modules called with no torch counterpart.
        notes: what was done to the reference before comparing, in words (:func:`trace_checkpoint`: FP8
            weights that transformers decoded wrongly, replaced by their exact decode).
    """

    pairs: list[TracePair]
    first_divergence: str | None
    unpaired_torch: list[str]
    unpaired_flax: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every paired module's output agrees within its tolerance."""
        return all(p.ok for p in self.pairs)

    def __str__(self) -> str:
        head = f"{'module (torch name)':<44}{'shape':<16}{'dtype':<10}{'max |err|':>11}{'rel':>10}{'cosine':>12}  verdict"
        lines = [head, "-" * len(head)]
        for p in self.pairs:
            mark = "  <- first divergence" if p.name == self.first_divergence else ""
            verdict = "ok" if p.ok else ("FAIL" if p.input_ok else "fail (input differs)")
            if p.flax_shape is not None:
                verdict += f": the Flax output is {'x'.join(map(str, p.flax_shape))}"
            lines.append(
                f"{p.name or '(model)':<44}{'x'.join(map(str, p.shape)):<16}{p.dtype:<10}{p.max_abs:>11.3g}"
                f"{p.max_rel:>10.2e}{p.cosine:>12.7f}  {verdict}{mark}"
            )
        lines.append(
            f"first divergence: {self.first_divergence or '(model)'}"
            if self.first_divergence is not None
            else "the two models agree"
        )
        if self.unpaired_torch:
            lines.append("torch modules with no Flax counterpart called: " + ", ".join(self.unpaired_torch))
        if self.unpaired_flax:
            lines.append("Flax modules with no torch counterpart: " + ", ".join(self.unpaired_flax))
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dataframe(self) -> Any:
        """The pairs as a ``pandas.DataFrame`` (pandas needed)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("to_dataframe needs pandas: pip install pandas") from e
        return pd.DataFrame([dataclasses.asdict(p) for p in self.pairs])

    def plot(self, ax: Any = None) -> Any:
        """Relative error by module in execution order (log scale), the first divergence marked
        (matplotlib needed). Returns the axes."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("plot needs matplotlib: pip install matplotlib") from e
        if ax is None:
            _, ax = plt.subplots(figsize=(10, 3.5))
        rel = [max(p.max_rel, 1e-12) for p in self.pairs]
        colors = ["tab:red" if not p.ok else "tab:blue" for p in self.pairs]
        ax.bar(range(len(rel)), rel, color=colors)
        ax.set_yscale("log")
        ax.set_ylabel("max |err| / max |torch|")
        ax.set_xlabel("module, in execution order")
        names = [p.name or "(model)" for p in self.pairs]
        step = max(1, len(names) // 24)
        ax.set_xticks(range(0, len(names), step), names[::step], rotation=90, fontsize=7)
        if self.first_divergence is not None:
            i = [p.name for p in self.pairs].index(self.first_divergence)
            ax.axvline(i, color="tab:red", linestyle="--", linewidth=1)
            ax.text(
                i,
                0.92,
                "first divergence",
                transform=ax.get_xaxis_transform(),
                color="black",
                ha="left",
                va="top",
                fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "tab:red", "boxstyle": "round,pad=0.2"},
            )
        return ax


def _first_array(value: Any) -> Any:
    """The first array of a module's output (a tuple's first; a model output's logits, last hidden state or
    first field; a dict's logits, last hidden state or first key in sorted order)."""
    import torch

    if isinstance(value, (torch.Tensor, np.ndarray)) or (hasattr(value, "shape") and hasattr(value, "dtype")):
        return value
    if isinstance(value, Mapping):
        for key in _search_order(value):
            found = _first_array(value[key])
            if found is not None:
                return found
        return None
    if hasattr(value, "to_tuple"):  # transformers ModelOutput
        return _first_array(value.to_tuple())
    if isinstance(value, (tuple, list)):
        for v in value:
            found = _first_array(v)
            if found is not None:
                return found
    return None


def _search_order(value: Mapping[Any, Any]) -> list[Any]:
    """A mapping output's keys in the order its first array is searched for: logits, last hidden state,
    then a transformers model output's fields in their order (which its tuple, ``return_dict=False``, and a
    port's follow), a dict's keys sorted (never by insertion order: the two sides may build dicts
    differently)."""
    order = list(value) if hasattr(value, "to_tuple") else sorted(value, key=str)
    return list(dict.fromkeys(k for k in ("logits", "last_hidden_state", *order) if k in value))


def _named(value: Any) -> dict[str, Any] | None:
    """A mapping output's first arrays by key, in :func:`_search_order`; None for other outputs."""
    if not isinstance(value, Mapping) or hasattr(value, "shape"):
        return None
    found = {str(k): _first_array(value[k]) for k in _search_order(value)}
    return {k: v for k, v in found.items() if v is not None} or None


def _first_input(args: tuple, kwargs: Mapping[str, Any]) -> Any:
    found = _first_array(args)
    if found is None:
        for key in ("hidden_states", "input_ids", "pixel_values", "x", "inputs"):
            if key in kwargs:
                return _first_array(kwargs[key])
        found = _first_array(kwargs)
    return found


@dataclasses.dataclass
class _Call:
    inp: Any
    out: Any
    start: int
    end: int
    # a mapping output's arrays by key, in the order _first_array searches them (paired by key, see trace)
    named: dict[str, Any] | None = None
    # torch only: the module whose output (the tensor itself) this call's input was, if any
    source: str | None = None


def _torch_run(module: Any, inputs: Any) -> dict[str, _Call]:
    import torch

    calls: dict[str, _Call] = {}
    pending: dict[str, tuple[Any, int, str | None]] = {}
    counter = [0]
    hooks = []
    # the tensors modules gave, while they live: id -> (a weak reference, the first module that gave it)
    made: dict[int, tuple[Any, str]] = {}

    def snapshot(x: Any) -> Any:  # values as they are now: torch may change the tensor in place later
        return x.detach().clone() if isinstance(x, torch.Tensor) else x

    def pre(name: str):
        def hook(mod: Any, args: tuple, kwargs: dict) -> None:
            counter[0] += 1
            inp = _first_input(args, kwargs)
            known = made.get(id(inp))
            source = known[1] if known is not None and known[0]() is inp else None
            pending[name] = (snapshot(inp), counter[0], source)

        return hook

    def post(name: str):
        def hook(mod: Any, args: tuple, kwargs: dict, output: Any) -> None:
            counter[0] += 1
            out = _first_array(output)
            if isinstance(out, torch.Tensor):
                known = made.get(id(out))
                if known is None or known[0]() is not out:  # an in-place module gives its input back
                    made[id(out)] = (weakref.ref(out), name)
            if name not in calls:  # a module called twice: its first call is compared
                inp, start, source = pending.get(name, (None, counter[0], None))
                named = _named(output)
                named = {k: snapshot(v) for k, v in named.items()} if named else None
                calls[name] = _Call(inp, snapshot(out), start, counter[0], named, source)

        return hook

    for name, sub in module.named_modules():
        hooks.append(sub.register_forward_pre_hook(pre(name), with_kwargs=True))
        hooks.append(sub.register_forward_hook(post(name), with_kwargs=True))
    try:
        with torch.no_grad():
            if isinstance(inputs, Mapping):
                module(**inputs)
            else:
                module(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _nnx_run(module: Any, inputs: Any) -> dict[str, _Call]:
    from flax import nnx

    paths = {
        id(node): _dotted(tuple(path))
        for path, node in nnx.iter_graph(module)
        if isinstance(node, nnx.Module)
    }
    calls: dict[str, _Call] = {}
    counter = [0]
    originals: dict[type, Any] = {}

    def wrap(cls: type) -> Any:
        call = cls.__call__

        def traced(self: Any, *args: Any, **kwargs: Any) -> Any:
            counter[0] += 1
            start, inp = counter[0], _first_input(args, kwargs)
            out = call(self, *args, **kwargs)
            counter[0] += 1
            name = paths.get(id(self))
            if name is not None and name not in calls:
                calls[name] = _Call(inp, _first_array(out), start, counter[0], _named(out))
            return out

        return traced

    for _, node in nnx.iter_graph(module):
        cls = type(node)
        if (
            isinstance(node, nnx.Module)
            and cls not in originals
            and "__call__" in {k for c in cls.__mro__ for k in vars(c)}
        ):
            owner = next(c for c in cls.__mro__ if "__call__" in vars(c))
            if owner not in originals:
                originals[owner] = owner.__call__
                owner.__call__ = wrap(owner)  # type: ignore[method-assign]  # undone below
    try:
        module(**inputs) if isinstance(inputs, Mapping) else module(*inputs)
    finally:
        for owner, call in originals.items():
            owner.__call__ = call  # type: ignore[method-assign]
    return calls


def _linen_run(module: Any, variables: Any, inputs: Any) -> dict[str, _Call]:
    from flax import linen as nn

    calls: dict[str, _Call] = {}
    counter = [0]

    def interceptor(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        counter[0] += 1
        start, inp = counter[0], _first_input(args, kwargs)
        out = next_fun(*args, **kwargs)
        counter[0] += 1
        name = _dotted(tuple(context.module.path))
        if name not in calls:
            calls[name] = _Call(inp, _first_array(out), start, counter[0], _named(out))
        return out

    with nn.intercept_methods(interceptor):
        if isinstance(inputs, Mapping):
            module.apply(variables, **inputs)
        else:
            module.apply(variables, *inputs)
    return calls


def _flax_names(name: str) -> list[str]:
    """A Flax path's torch-style names: itself, and linen's ``layers_3`` read as ``layers.3``."""
    parts = name.split(".") if name else []
    split: list[str] = []
    for seg in parts:
        m = _NUMBERED.match(seg)
        split.extend([m.group(1), m.group(2)] if m else [seg])
    return list(dict.fromkeys([name, ".".join(split)]))


def _as_numpy(x: Any) -> np.ndarray | None:
    """Values as numpy: floating ones as float32 (bfloat16 and float16 widen exactly), others as they are."""
    if x is None:
        return None
    import torch

    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        return t.float().numpy() if t.is_floating_point() else t.numpy()
    import jax.numpy as jnp

    a = np.asarray(x)
    return a.astype(np.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a


def _aligned(ref: np.ndarray, cand: np.ndarray, move: bool, certain: bool = False) -> np.ndarray | None:
    """``cand`` in ``ref``'s layout, or None where none fits: with its last axis moved to the second where
    ``move`` says Flax's output is channels-last where torch's is channels-first (:func:`_moves`; where the
    shapes are equal, a square output, only when ``certain``); else as is; else reshaped where Flax splits
    into several axes what torch holds in one, between a common start and end (``nnx.LinearGeneral``'s
    ``[batch, seq, heads, dim]`` against ``[batch, seq, heads * dim]``; a patch grid ``[batch, h, w, dim]``
    against ``[batch, h * w, dim]``). Two orders of the same axes (``[batch, vocab, seq]`` against
    ``[batch, seq, vocab]``), or axes Flax merges that torch keeps, are no layout: None."""
    if move and (certain or ref.shape != cand.shape) and _fits_moved(ref, cand):
        return np.moveaxis(cand, -1, 1)
    if ref.shape == cand.shape:
        return cand
    if cand.ndim <= ref.ndim:
        return None
    start = 0
    while start < ref.ndim and ref.shape[start] == cand.shape[start]:
        start += 1
    end = 0
    while end < ref.ndim - start and ref.shape[ref.ndim - 1 - end] == cand.shape[cand.ndim - 1 - end]:
        end += 1
    one, several = ref.shape[start : ref.ndim - end], cand.shape[start : cand.ndim - end]
    if len(one) == 1 and len(several) > 1 and math.prod(one) == math.prod(several):
        return cand.reshape(ref.shape)
    return None


def _fits_moved(ref: np.ndarray, cand: np.ndarray) -> bool:
    """Whether ``cand`` with its last axis moved to the second has ``ref``'s shape."""
    return cand.ndim >= 3 and (cand.shape[0], cand.shape[-1], *cand.shape[1:-1]) == ref.shape


def _channels_first_input(ref: np.ndarray | None, cand: np.ndarray | None) -> bool:
    """Whether torch's input is channels-first where Flax's is channels-last (not where either fits)."""
    return ref is not None and cand is not None and ref.shape != cand.shape and _fits_moved(ref, cand)


def trace(
    torch_module: Any,
    flax_module: Any,
    inputs: Any,
    *,
    variables: Any = None,
    flax_inputs: Any = None,
    rename: Mapping[str, str] | None = None,
    rtol: float | None = None,
    min_cosine: float | None = None,
) -> TraceReport:
    """Runs a torch model and its Flax port on the same inputs and compares every submodule's output.

    Args:
        torch_module: the torch original (plain, bitsandbytes- or torchao-quantized), a ``torch.nn.Module``.
        flax_module: the Flax port: an ``nnx.Module`` (run eagerly), or a linen ``Module`` with
            ``variables`` (its ``{"params": ...}``), e.g. one loaded by :func:`qbridge.load_checkpoint`
            (dense or kept quantized).
        inputs: tensors (token ids, pixel values...): one, a tuple of them (positional) or a dict (keyword);
            torch tensors, or numpy/JAX arrays (taken as torch tensors of their values). The Flax side gets
            the same values through :func:`qbridge.to_jax`.
        variables: the linen variables (required for a linen module).
        flax_inputs: the Flax side's inputs where they differ (channels-last images, say).
        rename: regex -> replacement applied to torch module names before pairing, as ``load_checkpoint``'s
            ``rename`` does to checkpoint keys.
        rtol, min_cosine: override :func:`qbridge.parity.compare`'s dtype-aware tolerances.

    A torch module and the Flax module of its name are paired; where their outputs' shapes differ, after
    matching the layouts a correct port gives (Flax's channels-last outputs of convolutions and of the layers
    and blocks after them; heads split into an axis of their own), the pair fails (see :class:`TracePair`).
    The models themselves (``(model)``) are paired too: a port whose output is not torch's output (hidden
    states for logits, another layout) fails there.

    Returns:
        A :class:`TraceReport` (``report.first_divergence``, ``print(report)``, ``report.plot()``).

    Raises:
        TypeError: ``torch_module`` is no ``torch.nn.Module`` (the two models given the other way round, say),
            ``flax_module`` is neither an nnx nor a linen module, or a linen module without variables.
    """
    import torch

    from ._handoff import to_jax

    if not isinstance(torch_module, torch.nn.Module):
        swapped = isinstance(flax_module, torch.nn.Module)
        raise TypeError(
            f"torch_module must be a torch.nn.Module, got {type(torch_module).__name__}"
            + (
                "; the two models are given the other way round: trace(torch_model, flax_model, ...)"
                if swapped
                else ""
            )
        )

    def as_torch(x: Any) -> Any:  # numpy or JAX arrays (token ids ...) as torch tensors of their values
        return (
            x if isinstance(x, torch.Tensor) or not hasattr(x, "__array__") else torch.from_numpy(np.array(x))
        )

    if isinstance(inputs, torch.Tensor) or hasattr(inputs, "__array__"):
        inputs = (inputs,)
    inputs = (
        {k: as_torch(v) for k, v in inputs.items()}
        if isinstance(inputs, Mapping)
        else tuple(map(as_torch, inputs))
    )
    if flax_inputs is None:
        convert = lambda t: to_jax(t) if isinstance(t, torch.Tensor) else t  # noqa: E731
        flax_inputs = (
            {k: convert(v) for k, v in inputs.items()}
            if isinstance(inputs, Mapping)
            else tuple(convert(v) for v in inputs)
        )
    torch_calls = _torch_run(torch_module, inputs)
    try:
        from flax import linen, nnx
    except ImportError as e:  # pragma: no cover - flax is an extra
        raise ImportError("trace needs flax: pip install 'qbridge[flax]'") from e
    if isinstance(flax_module, nnx.Module):
        flax_calls = _nnx_run(flax_module, flax_inputs)
    elif isinstance(flax_module, linen.Module):
        if variables is None:
            raise TypeError("a linen module needs its variables: trace(..., variables={'params': params})")
        flax_calls = _linen_run(flax_module, variables, flax_inputs)
    else:
        raise TypeError(
            f"flax_module must be an nnx.Module or a linen.Module, got {type(flax_module).__name__}"
        )

    # torch convolutions give channels-first outputs (and so do the layers after them), Flax's channels-last:
    # each module's output is moved back where its own layout says so (see the loop)
    modules = dict(torch_module.named_modules())
    channels_first = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in modules.values())
    moved: dict[str, bool] = {}  # paired modules' outputs, by name: whether moved back
    # the same, and for torch modules without a counterpart that keep their input's layout (a ReLU, a pooling
    # that Flax calls as a function): whether torch's output is channels-first where Flax's is channels-last
    layout: dict[str, bool] = {}
    by_torch_name: dict[str, str] = {}
    for name in flax_calls:
        for candidate in _flax_names(name):
            by_torch_name.setdefault(candidate, name)
    pairs, unpaired_torch, paired_flax = [], [], set()
    for name, call in sorted(torch_calls.items(), key=lambda kv: kv[1].end):
        key = name
        for pattern, repl in (rename or {}).items():
            key = re.sub(pattern, repl, key)
        flax_name = by_torch_name.get(key)
        out, their_out = call.out, None if flax_name is None else flax_calls[flax_name].out
        if flax_name is not None and call.named and flax_calls[flax_name].named:  # two mappings: by key
            theirs_named = flax_calls[flax_name].named or {}
            common = next((k for k in call.named if k in theirs_named), None)
            if common is not None:
                out, their_out = call.named[common], theirs_named[common]
        ref, cand = _as_numpy(out), None if their_out is None else _as_numpy(their_out)
        if flax_name is None or ref is None or cand is None:
            unpaired_torch.append(name or "(model)")
            module = modules.get(name)
            if module is not None and next(module.children(), None) is None:  # a leaf: its input's layout
                if isinstance(module, torch.nn.modules.conv._ConvNd):
                    layout[name] = True
                elif call.source in layout:
                    layout[name] = layout[call.source]
            continue
        paired_flax.add(flax_name)
        theirs = flax_calls[flax_name]
        known = layout.get(call.source) if call.source is not None else None  # its input's layout
        input_ok = _inputs_agree(call.inp, theirs.inp, rtol, min_cosine, channels_first, known)
        dtype = _dtype_name(out, their_out)
        move, certain = (
            _moves(name, modules.get(name), call, theirs, torch_calls, moved, layout)
            if channels_first
            else (False, False)
        )
        aligned = _aligned(ref, cand, move, certain)
        moved[name] = layout[name] = aligned is not None and move and aligned is not cand
        if aligned is None:  # the module of that name gives another shape: where the ports part ways
            inf = float("inf")
            pairs.append(TracePair(name, flax_name, tuple(ref.shape), dtype, inf, inf, float("nan"), False, input_ok,
                                   call.end, tuple(cand.shape)))  # fmt: skip
            continue
        tol, cos = _tolerances(out, their_out, rtol, min_cosine)
        o = _parity(ref, out, aligned, their_out, tol, cos)
        pairs.append(TracePair(name, flax_name, tuple(ref.shape), dtype, o.max_abs, o.max_rel, o.cosine, o.ok,
                               input_ok, call.end))  # fmt: skip
    first = _first_divergence(pairs, torch_calls)
    unpaired_flax = [n or "(model)" for n in flax_calls if n not in paired_flax]
    return TraceReport(pairs, first, unpaired_torch, unpaired_flax)


def _moves(
    name: str,
    module: Any,
    call: _Call,
    theirs: _Call,
    calls: Mapping[str, _Call],
    moved: Mapping[str, bool],
    layout: Mapping[str, bool],
) -> tuple[bool, bool]:
    """Whether a module's Flax output is channels-last where torch's is channels-first (in a torch model
    with convolutions), and whether that is known rather than guessed from shapes: ``(move, certain)``.

    - a convolution's: known;
    - a module with paired submodules, from the last of them to finish: its layout where the module's output
      has its shape, or its sizes at another resolution (pooled); the other layout where torch permuted it
      (ConvNeXt's and wav2vec2's blocks permute back to channels-first after a LayerNorm or Linear that sees
      channels-last data on both sides; a model whose convolution gives ``[batch, vocab, seq]`` and returns
      ``[batch, seq, vocab]``);
    - else, from its input: the layout of the module whose output it is (known: the tensor itself, seen
      by the hooks), or, for an input no module gave (the model's own, or one computed between modules),
      channels-first in torch where Flax's is channels-last (guessed: a square input is not).
    """
    import torch

    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return True, True
    inside = [] if module is None or next(module.children(), None) is None else [
        child for child in moved if child != name and (name == "" or child.startswith(name + "."))
        and calls[child].start > call.start and calls[child].end < call.end
    ]  # fmt: skip
    if inside:
        last = max(inside, key=lambda child: calls[child].end)
        mine, its = tuple(getattr(call.out, "shape", ())), tuple(getattr(calls[last].out, "shape", ()))
        if len(mine) == len(its):
            permuted = mine != its and sorted(mine) == sorted(its)
            return moved[last] != permuted, True
    if call.source is not None and call.source in layout and call.source != name:
        return layout[call.source], True
    return _channels_first_input(_as_numpy(call.inp), _as_numpy(theirs.inp)), False


def _dtype_name(a: Any, b: Any) -> str:
    from ._compare import _ORDER, _kind

    return min(
        _kind(str(getattr(a, "dtype", "float32"))),
        _kind(str(getattr(b, "dtype", "float32"))),
        key=_ORDER.index,
    )


def _tolerances(a: Any, b: Any, rtol: float | None, min_cosine: float | None) -> tuple[float, float]:
    from ._compare import TOLERANCES

    default_rtol, default_cos = TOLERANCES[_dtype_name(a, b)]
    return (rtol if rtol is not None else default_rtol, min_cosine if min_cosine is not None else default_cos)


def _inputs_agree(
    a: Any, b: Any, rtol: float | None, min_cosine: float | None, channels_first: bool, moved: bool | None
) -> bool:
    """Whether a module's inputs agree; ``moved``: whether the module that gave torch's input had its Flax
    output moved back (None: not known, guessed from the shapes)."""
    ref, cand = _as_numpy(a), _as_numpy(b)
    if ref is None or cand is None:
        return True  # nothing to compare: taken as agreeing
    # not known: moved where the shapes say so (they differ, and fit moved), as _aligned does uncertain
    cand = _aligned(ref, cand, channels_first and moved is not False, certain=moved is not None)
    if cand is None:
        return False
    if ref.dtype.kind not in "fc":
        return bool(np.array_equal(ref, cand))
    tol, cos = _tolerances(a, b, rtol, min_cosine)
    return _parity(ref, a, cand, b, tol, cos).ok


def _parity(
    ref: np.ndarray, ref_of: Any, cand: np.ndarray, cand_of: Any, rtol: float, min_cosine: float
) -> Any:
    """:func:`qbridge.parity.compare` of one output, ``ref`` and ``cand`` as :func:`_as_numpy` gave them
    (floats widened to float32) from the values ``ref_of`` and ``cand_of``, whose dtypes name the mask values
    (a bfloat16 output's ``finfo.min`` is not float32's)."""
    from ._compare import _numpy, _output_parity

    return _output_parity(
        "o", _numpy(ref)[0], str(getattr(ref_of, "dtype", ref.dtype)), _numpy(cand)[0],
        str(getattr(cand_of, "dtype", cand.dtype)), rtol, min_cosine,
    )  # fmt: skip


def _first_divergence(pairs: list[TracePair], calls: Mapping[str, _Call]) -> str | None:
    """The first module (by the end of its call) whose input agrees and output does not, and whose
    submodules called with agreeing inputs all agree."""
    for p in pairs:
        if p.ok or not p.input_ok:
            continue
        inside = [q for q in pairs if q.name != p.name and _child_of(q.name, p.name)
                  and calls[p.name].start < calls[q.name].start and calls[q.name].end < calls[p.name].end]  # fmt: skip
        if all(q.ok or not q.input_ok for q in inside):
            return p.name
    bad = [
        p for p in pairs if not p.ok
    ]  # no such module (every failing one saw a differing input): the first failure
    return bad[0].name if bad else None


def _child_of(child: str, parent: str) -> bool:
    return parent == "" or child.startswith(parent + ".")


def trace_checkpoint(
    path: Any,
    *,
    model: str = "llama",
    keep_quantized: bool = False,
    tokens: int = 16,
    batch: int = 2,
    seed: int = 0,
    **tolerances: Any,
) -> TraceReport:
    """:func:`trace` for a checkpoint directory: transformers' torch model of it (quantized as saved) against a
    Flax model loaded from it by :func:`qbridge.load_checkpoint`, on random token ids.

    Where transformers decodes FP8 weights into dense ones (on a CPU) and a decoded weight differs from
    ``float8 value * its block's scale_inv`` rounded once to the weight's dtype (transformers 5 derives the
    block size from the scale grid, so partial 128-tiles get blocks of ``rows // scale_rows``), that weight of
    the torch model is replaced by its exact decode (``torch_side.dequantize_fp8``) before the run, and the
    report's ``notes`` say which and by how much they differed: the comparison then tests the Flax model,
    not transformers' decode. Where bitsandbytes cannot run a 4-bit torch model on the CPU (its CPU path
    fails for in-dimensions that are not a multiple of its blocksize), the reference is transformers'
    model of the config holding every weight decoded exactly (the bits of bitsandbytes' CUDA kernel), and
    a note says so.

    Args:
        path: a transformers checkpoint directory (``config.json`` with ``architectures``).
        model: ``"llama"`` (``jax_side``'s Flax Llama) or ``"package.module:Name"``, a flax.nnx Module class
            (or factory) called as ``Name(config_dict, rngs=nnx.Rngs(0))``.
        keep_quantized: load the Flax model kept quantized (``load_quantized_into_nnx``).
        tokens, batch, seed: the random token ids' shape (positive) and seed.
        tolerances: ``rtol`` / ``min_cosine`` for :func:`trace`.

    Raises:
        CheckpointError: no ``config.json``, a missing, truncated or unreadable weight file (naming it), or a
            checkpoint transformers cannot build a model from.
        ValueError: ``tokens`` or ``batch`` below 1, ``tokens`` beyond the config's
            ``max_position_embeddings``, or a ``model`` path that names nothing.
        ImportError: ``model``'s module cannot be imported.
    """
    import inspect
    import pathlib

    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx

    import jax_side

    from ._checkpoint import open_checkpoint, read_config
    from ._errors import CheckpointError, first_line
    from ._loader import load_checkpoint
    from ._targets import import_object

    for name, value in (("tokens", tokens), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive number of token ids, got {value!r}")
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: no such checkpoint directory"
            if not path.exists()
            else f"{path}: parity needs the checkpoint's directory (config.json and the weights), not a file"
        )
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: no config.json there; parity needs a transformers checkpoint directory (config.json with "
            "architectures, and the weights)"
        )
    config = read_config(path)  # checked: it is untrusted input
    positions = config.get("max_position_embeddings")
    if isinstance(positions, int) and not isinstance(positions, bool) and 0 < positions < tokens:
        raise ValueError(
            f"tokens={tokens}: {path}'s config.json gives the model {positions} positions "
            f"(max_position_embeddings); pass at most {positions}"
        )
    # opened first: missing, truncated or unreadable files are named before transformers reads them
    with open_checkpoint(path) as ckpt:
        if model == "llama":  # built once the torch model's dtype is known (below); its config checked now
            llama = jax_side.LlamaConfig.from_hf(config)
        else:
            if ":" not in model:
                raise ValueError(
                    f"model {model!r}: 'llama', or an nnx Module class by import path, 'package.module:Name'"
                )
            factory = import_object(model, "model")
            try:  # the calling convention is checked; errors from inside the factory are the factory's own
                # a class: its __init__ (nnx's metaclass shows the class as (*args, **kwargs))
                if isinstance(factory, type):
                    init = next(vars(c)["__init__"] for c in factory.__mro__ if "__init__" in vars(c))
                    inspect.signature(init).bind(None, config, rngs=None)
                else:
                    inspect.signature(factory).bind(config, rngs=None)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"model {model!r} cannot be called as {model.partition(':')[2]}(config_dict, "
                    f"rngs=nnx.Rngs(0)) ({e}); name an nnx Module class (or factory) that takes the config dict "
                    "and rngs"
                ) from e
            flax_model = factory(config, rngs=nnx.Rngs(0))
        load_report: list[str] = []
        try:
            with _transformers_quiet(load_report):  # its load report kept; what went wrong is said below
                built: Any = transformers.AutoModelForCausalLM.from_pretrained(
                    path, attn_implementation="eager", device_map="cpu", output_loading_info=True
                )
                torch_model, loading = built[0].eval(), built[1]
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            cause = _conversion_error("\n".join(load_report))
            # transformers' error points to its load report, which was not shown: that report's first error
            why = (
                f"{type(e).__name__}: {first_line(e)}"
                if cause is None
                else f"{type(e).__name__} in its weight conversion: {cause}"
            )
            if ckpt.format != "fp8":
                raise CheckpointError(f"{path}: transformers could not build its torch model ({why})") from e
            with _transformers_quiet():
                torch_model = _decoded_reference(path)  # e.g. partial tiles the scale grid does not divide
            notes = [
                f"transformers {transformers.__version__} could not build the FP8 model ({why}); "
                f"{_EXACT_REFERENCE} (qbridge.dequantized_state)"
            ]
        else:
            missing = sorted(loading.get("missing_keys") or ())
            # tensors the checkpoint holds that transformers could not read: left at their random initial
            # values (a tensor the checkpoint lacks is the load's error to report, below)
            if missing and all(k in ckpt.entries for k in missing):
                with _transformers_quiet():
                    torch_model = _decoded_reference(path)
                notes = [
                    f"transformers {transformers.__version__} left {len(missing)} weight(s) of the checkpoint "
                    f"unread, newly initialized ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
                    f"{_EXACT_REFERENCE} (qbridge.dequantized_state)"
                ]
            elif ckpt.format == "bitsandbytes-8bit":
                with _transformers_quiet():
                    torch_model = _decoded_reference(path)
                notes = [
                    "bitsandbytes' 8-bit layers round their inputs to int8 too (LLM.int8()), which a model of "
                    f"dequantized weights does not; {_EXACT_REFERENCE} (qbridge.dequantized_state)"
                ]
            else:
                notes = _exact_fp8_reference(torch_model, ckpt) if ckpt.format == "fp8" else []
        fmt = ckpt.format
    if model == "llama":  # in the torch model's dtype: what transformers made of config.json (or the weights)
        dtype = {torch.float32: jnp.float32, torch.float16: jnp.float16}.get(torch_model.dtype, jnp.bfloat16)
        flax_model = jax_side.llama_for_causal_lm(llama, param_dtype=dtype)
    params = load_checkpoint(path, target=flax_model, keep_quantized=keep_quantized, progress=False)
    if keep_quantized:
        jax_side.load_quantized_into_nnx(flax_model, params)
    else:
        nnx.update(flax_model, params)
    ids = torch.from_numpy(
        np.random.default_rng(seed).integers(0, int(config["vocab_size"]), (batch, tokens))
    )
    try:
        report = trace(torch_model, flax_model, ids, **tolerances)
    except (RuntimeError, AssertionError) as e:  # (the Flax model's own errors: raised by the trace below)
        if fmt != "bitsandbytes-4bit" or any(p.is_cuda for p in torch_model.parameters()):
            raise
        # bitsandbytes' CPU 4-bit path fails for some shapes (an in-dimension not a multiple of its blocksize:
        # a RuntimeError, or an AssertionError where its packed-weight conversion asserts on the out-dimension)
        import bitsandbytes

        with _transformers_quiet():
            torch_model = _decoded_reference(path)
        notes.append(
            f"bitsandbytes {bitsandbytes.__version__} could not run the 4-bit torch model on the CPU "
            f"({type(e).__name__}: {first_line(e)}); {_EXACT_REFERENCE} (qbridge.dequantized_state, the bits of "
            "bitsandbytes' CUDA kernel)"
        )
        report = trace(torch_model, flax_model, ids, **tolerances)
    report.notes.extend(notes)
    return report


# what a report's note says when the torch reference is _decoded_reference's model
_EXACT_REFERENCE = (
    "the torch reference is transformers' model of the config without its quantization_config, holding every "
    "weight decoded exactly"
)


@contextlib.contextmanager
def _transformers_quiet(report: list[str] | None = None) -> Iterator[None]:
    """transformers' logging at errors only and its progress bars off, restored after. With ``report``, its
    warnings (such as the load report of ``from_pretrained``) are appended to that list instead of shown."""
    from transformers.utils import logging as tlog

    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    root = tlog.get_logger()  # the library's root logger
    kept = _Collect(report) if report is not None else None
    handlers, propagate = list(root.handlers), root.propagate
    if kept is None:
        tlog.set_verbosity_error()
    else:
        tlog.set_verbosity(logging.WARNING)
        root.handlers[:] = [kept]
        root.propagate = False
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        root.handlers[:], root.propagate = handlers, propagate
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


class _Collect(logging.Handler):
    """Appends each record's text to a list."""

    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


def _conversion_error(report: str) -> str | None:
    """The first error of transformers' load report (its ``CONVERSION`` entries: the tensor it was making
    and the exception), or None. The report is styled with terminal escapes, which are dropped."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", report)
    error = re.search(r"^(\w+(?:Error|Exception): .+)$", text, re.MULTILINE)
    if error is None:
        return None
    tensor = re.search(r"destined for (\S+?)\.? Ckpt", text)
    return f"{tensor.group(1)}: {error.group(1)}" if tensor else error.group(1)


def _decoded_reference(path: Any) -> Any:
    """transformers' model of a quantized checkpoint's config, unquantized, holding its exactly decoded
    weights."""
    import torch
    import transformers

    from ._errors import CheckpointError
    from ._loader import dequantized_state

    config = transformers.AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    torch_model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    torch_model = torch_model.to(
        dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))
    ).eval()
    missing, unexpected = torch_model.load_state_dict(dequantized_state(path), strict=False)
    torch_model.tie_weights()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{path}: the decoded weights do not fit transformers' model of the config (missing "
            f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    return torch_model


def _exact_fp8_reference(torch_model: Any, ckpt: Any) -> list[str]:
    """Replaces the dense weights that transformers decoded from FP8 where they differ from the exact decode
    (read from the open checkpoint ``ckpt``); returns a note saying so (none when nothing differed)."""
    import torch
    import transformers

    import torch_side

    params = dict(torch_model.named_parameters())
    wrong: list[tuple[float, str]] = []
    causes: set[str] = set()  # what the wrongly decoded weights have in common, where it is known
    for entry in ckpt.entries.values():
        p = params.get(entry.name)
        if entry.kind != "fp8" or p is None or not p.is_floating_point() or p.element_size() == 1:
            continue  # kept as float8 (transformers' own FP8 matmul), or not a parameter here
        if tuple(p.shape) != entry.shape:
            continue
        exact = torch_side.dequantize_fp8(
            ckpt.read(entry.keys["weight"]), ckpt.read(entry.keys["scale"]), p.dtype,
            block_size=entry.info["block_size"],
        )  # fmt: skip
        if not torch.equal(p.detach().cpu(), exact):
            wrong.append(((p.detach().cpu().float() - exact.float()).abs().max().item(), entry.name))
            if entry.info.get("partial"):
                causes.add("partial tiles decoded with blocks sized from the scale grid")
            if not entry.keys["scale"].endswith("_scale_inv"):
                causes.add(f"scales stored as {entry.keys['scale'].rpartition('.')[2]}, not weight_scale_inv")
            with torch.no_grad():
                p.copy_(exact.to(p.device))
    if not wrong:
        return []
    worst, name = max(wrong)
    why = f"; {', '.join(sorted(causes))}" if causes else ""
    return [
        f"transformers {transformers.__version__} decoded {len(wrong)} FP8 weight(s) to values other than their "
        f"scales give (largest difference {worst:.3g}, in {name}{why}); the torch reference ran with their exact "
        "decode (torch_side.dequantize_fp8)"
    ]
