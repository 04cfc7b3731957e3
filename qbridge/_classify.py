"""Which checkpoint tensors are parameters, which torch module kind owns each, and which are no parameters
at all: decided by rules from the producer and the stored format, never by shapes.

Sources, strongest first:

1. The quantization method's documented tensors that are not weights: FP8 checkpoints' activation,
   KV-cache and attention-probability scales (``input_scale``, ``output_scale``, ``k_scale``, ``v_scale``,
   ``q_scale``, ``prob_scale``, ``kv_scale``), bitsandbytes 8-bit's ``weight_format`` tag.
2. The torch model itself. With transformers installed and an ``architectures`` entry in ``config.json``
   the model is built on the meta device (no memory, no weights) and asked: each module's class gives
   its kind (subclasses of ``nn.Embedding`` are embeddings, transformers' ``Conv1D`` stores ``[in, out]``
   and, once bitsandbytes has quantized it, ``[out, in]``), its non-persistent buffers are caches, and
   its tied-weight map names the copies of tied tensors. Building it costs an import of transformers (a
   second to 15 s, by what it imports along), so it happens when the answer can change the result: loading
   without a target, an architecture whose transformers modeling code uses ``Conv1D``, or tensors that
   nothing else explains. The answer is remembered in qbridge's cache directory (:func:`cache_dir`) under
   a hash of the config, of the transformers, torch and qbridge versions and of this file, so later
   processes loading the same model skip the import.
3. Name rules (``jax_side.infer_kind``, ``jax_side.buffer_reason``) elsewhere: these are guesses, and the
   report lists the tensors classified that way.

A tied copy is recognised by the config or the model's tied map *and* by being equal to the tensor it
copies; one that differs stays a parameter. Tensors that are no parameters are *optional*: a target leaf
that asks for one gets it; otherwise it is skipped and reported with its reason, never turned into a Flax
parameter.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import re
import threading
from typing import Any

import torch

import jax_side
from torch_side._cache import cache_dir

log = logging.getLogger("qbridge")

# tensors a quantization method documents as no weights, by the last name component
NOT_WEIGHTS = {
    "fp8": {
        "input_scale": "FP8 static activation scale",
        "output_scale": "FP8 output activation scale",
        "k_scale": "FP8 KV-cache scale",
        "v_scale": "FP8 KV-cache scale",
        "kv_scale": "FP8 KV-cache scale",
        "q_scale": "FP8 query scale",
        "prob_scale": "FP8 attention-probability scale",
    },
    "bitsandbytes": {"weight_format": "bitsandbytes 8-bit weight-layout tag"},
}
# names under which checkpoints keep the output embedding that tied models share with the input one
OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight", "output.weight", "cls.predictions.decoder.weight")


@dataclasses.dataclass
class ModuleInfo:
    """What the torch model says about its tensors (built on the meta device)."""

    architecture: str
    kinds: dict[str, str]  # parameter or buffer name -> kind of the owning module
    classes: dict[str, str]  # the same names -> the owning module's class name
    non_persistent: set[str]  # buffers the model does not save (caches)
    tied: dict[str, str]  # tied copy -> the tensor it shares
    shapes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)  # every tensor's torch shape
    # regular expressions (searched) of names a checkpoint may lack: the model's _keys_to_ignore_on_save and
    # _keys_to_ignore_on_load_missing (transformers saves without them, or loads without a word)
    may_lack: list[str] = dataclasses.field(default_factory=list)
    # regular expressions (searched) of checkpoint names whose values transformers converts when it loads
    # (its weight converters: fused, split or transposed in place): the model's sizes may be stored reordered
    converted: list[str] = dataclasses.field(default_factory=list)
    # regular expressions (searched) of names a checkpoint may hold that the model does not have: the model's
    # _keys_to_ignore_on_load_unexpected (DeepSeek-V3's multi-token-prediction layer, model.layers.61)
    may_have: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Classification:
    """The checkpoint's tensors, classified.

    Attributes:
        optional: ``key -> reason`` for tensors that are no parameters (skipped unless a target asks).
        kinds: ``key -> torch module kind`` for parameters whose owning module is known or guessed.
        guessed: parameter keys whose kind comes from name rules.
        conv1d: keys owned by transformers' ``Conv1D`` modules (stored ``[in, out]`` unless quantized).
        source: where the module kinds came from, in words.
        kept_tied: ``key -> why`` for copies the config or the model ties to another tensor that the
            checkpoint holds otherwise (quantized where the other is not, or with different values): they stay
            parameters of their own, which a target that ties them has no leaf for.
    """

    optional: dict[str, str] = dataclasses.field(default_factory=dict)
    kinds: dict[str, str] = dataclasses.field(default_factory=dict)
    guessed: list[str] = dataclasses.field(default_factory=list)
    conv1d: set[str] = dataclasses.field(default_factory=set)
    source: str = "name rules"
    kept_tied: dict[str, str] = dataclasses.field(default_factory=dict)


def torch_kind(module: torch.nn.Module, ndim: int = 2) -> str:
    """The module kind (``jax_side.KINDS``) of a torch module, from its class."""
    nn = torch.nn
    name = type(module).__name__
    if name == "Conv1D" and type(module).__module__.startswith("transformers"):
        return "hf_conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    for nd, (conv, transposed) in enumerate(
        ((nn.Conv1d, nn.ConvTranspose1d), (nn.Conv2d, nn.ConvTranspose2d), (nn.Conv3d, nn.ConvTranspose3d)), 1
    ):
        if isinstance(module, transposed):
            return f"conv_transpose{nd}d"
        if isinstance(module, conv):
            return f"conv{nd}d"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        return "rmsnorm"
    if name.endswith("Norm"):  # the models' own norms (LlamaRMSNorm, T5LayerNorm ...): a scale, maybe a bias
        return "layernorm" if getattr(module, "bias", None) is not None else "rmsnorm"
    if ndim == 3 and "expert" in name.lower():
        return "stacked_linear"
    return "param"


# the matrices of a feed-forward expert by the side the model's hidden size is on: its input, or its output
_INPUT_SIDE = frozenset({"gate_up_proj", "gate_proj", "up_proj", "w1", "w3", "fc1"})
_OUTPUT_SIDE = frozenset({"down_proj", "w2", "fc2"})


def _hidden_sizes(config: dict[str, Any]) -> set[int]:
    """The hidden sizes a config names (its own, and its sub-configs', such as a ``text_config``)."""
    sizes = {v for k in ("hidden_size", "d_model", "n_embd") if isinstance(v := config.get(k), int)}
    for sub in config.values():
        if isinstance(sub, dict):
            sizes |= _hidden_sizes(sub)
    return sizes


def experts_stored_in_out(module: torch.nn.Module, hidden: set[int]) -> bool | None:
    """Whether a module of stacked expert matrices stores them ``[experts, in, out]`` (multiplied as
    ``x @ W[e]``: GPT-OSS, Llama 4), already the Flax kernel's layout, rather than ``[experts, out, in]``
    (``F.linear``: Mixtral, Qwen MoE, DeepSeek), which ``stacked_linear`` transposes. Told by the side that
    holds the model's hidden size in a matrix whose role its name gives (an input-side ``gate_up_proj``, an
    output-side ``down_proj``); None when no matrix tells (square, or unknown names)."""
    for leaf, p in module.named_parameters(recurse=False):
        if p.dim() != 3 or (p.shape[1] in hidden) == (p.shape[2] in hidden):
            continue
        if leaf in _INPUT_SIDE:
            return p.shape[1] in hidden
        if leaf in _OUTPUT_SIDE:
            return p.shape[2] in hidden
    return None


def _transformers_dir() -> pathlib.Path | None:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def architecture_uses_conv1d(config: dict[str, Any]) -> bool:
    """Whether the config's architecture may hold transformers ``Conv1D`` modules, read from its modeling
    source without importing it (True when that source cannot be found: then the model must be asked)."""
    root, model_type = _transformers_dir(), str(config.get("model_type") or "")
    if root is None or not config.get("architectures"):
        return False
    folder = root / "models" / model_type.replace("-", "_")
    sources = sorted(folder.glob("modeling_*.py")) if folder.is_dir() else []
    sources = [s for s in sources if not s.name.startswith(("modeling_flax", "modeling_tf"))]
    if not sources:
        return True
    return any("Conv1D" in s.read_text(errors="replace") for s in sources)


LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers")


def _layer_count(config: Any) -> int:
    """The layers a config names, over its sub-configs too (``text_config``, ``encoder``...): every positive
    integer under a name of ``LAYER_FIELDS`` or ``num_*layers`` / ``n_*layers`` (T5's ``num_decoder_layers``
    say). An upper bound on the layers a model built from it has: it bounds the work building asks for."""
    total, todo = 0, [config]
    while todo:  # not recursive: a config may nest as deep as its JSON parser allowed
        node = todo.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(value, (dict, list)):
                todo.append(value)
            elif type(value) is int and value > 0 and _names_layers(key):  # not a bool
                total += value
    return total


def _names_layers(key: Any) -> bool:
    return isinstance(key, str) and (
        key in LAYER_FIELDS or (key.startswith(("num_", "n_")) and key.endswith(("layers", "layer")))
    )


def module_info(config: dict[str, Any], tensors: int | None = None) -> tuple[ModuleInfo | None, str]:
    """The torch model of ``config`` built on the meta device and asked about its tensors, or None and why.

    ``tensors``, the checkpoint's tensor count, bounds the work a config can ask for: a config naming more
    layers than that is not built (building takes time in proportion to the layers)."""
    architectures = config.get("architectures") or []
    if not config:  # no config.json, or an empty one
        return None, "no config.json to name an architecture"
    if not architectures:
        return None, "config.json names no architecture"
    layers = _layer_count(config)
    if tensors is not None and layers > max(tensors, 8):
        return None, f"config.json names {layers} layers for {tensors} tensors; the model was not built"
    if _transformers_dir() is None:
        return None, "transformers is not installed"
    arch = str(architectures[0])
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    remembered = _cache_file(arch, plain)
    info = _read_info(remembered, arch)
    if info is not None:
        return info, f"{arch} built on the meta device (remembered from an earlier build: {remembered})"
    try:
        import transformers

        cls = getattr(transformers, arch, None)
        if cls is None:
            return None, f"transformers has no {arch}"
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            cfg = cls.config_class.from_dict(plain)
            with torch.device("meta"):
                model = cls._from_config(cfg)
        finally:
            transformers.logging.set_verbosity(verbosity)
    except Exception as e:
        return (
            None,
            f"could not build {arch} on the meta device ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
        )
    kinds, classes, non_persistent, shapes = {}, {}, set(), {}
    hidden = _hidden_sizes(plain)
    for prefix, module in model.named_modules(remove_duplicate=False):
        own = [*module.named_parameters(prefix=prefix, recurse=False, remove_duplicate=False),
               *module.named_buffers(prefix=prefix, recurse=False, remove_duplicate=False)]  # fmt: skip
        in_out = "expert" in type(module).__name__.lower() and experts_stored_in_out(module, hidden)
        for name, value in own:
            shapes[name] = tuple(value.shape)
            kind = torch_kind(module, value.dim())
            # [experts, in, out] storage is the kernels' layout already: kept as stored
            kinds[name] = "param" if kind == "stacked_linear" and in_out else kind
            classes[name] = type(module).__name__
        for buffer in getattr(module, "_non_persistent_buffers_set", ()):
            non_persistent.add(f"{prefix}.{buffer}" if prefix else buffer)
    # tied tensors are one Parameter under several names once the model has tied them (transformers does in
    # post_init): each later name is a copy of the first
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    for copy, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        tied.setdefault(str(copy), str(source))
    info = ModuleInfo(
        arch,
        kinds,
        classes,
        non_persistent,
        tied,
        shapes,
        _may_lack(model),
        _converted(model),
        _may_have(model),
    )
    _write_info(remembered, info)
    return info, f"{arch} built on the meta device"


def _may_lack(model: torch.nn.Module) -> list[str]:
    """Regular expressions of the names a checkpoint of ``model`` may lack: each transformers model's (and
    sub-model's) ``_keys_to_ignore_on_save`` (names, left out when saving: Marian's sinusoidal positions)
    and ``_keys_to_ignore_on_load_missing`` (patterns loaded without a word: BART's final_logits_bias)."""
    out: list[str] = []
    for prefix, module in model.named_modules():
        for name in getattr(module, "_keys_to_ignore_on_save", None) or ():
            out.append(re.escape(f"{prefix}.{name}" if prefix else str(name)) + "$")
        out.extend(str(p) for p in getattr(module, "_keys_to_ignore_on_load_missing", None) or ())
    return sorted(set(out))


def _may_have(model: torch.nn.Module) -> list[str]:
    """Regular expressions of the names a checkpoint of ``model`` may hold that it does not have: each
    transformers model's (and sub-model's) ``_keys_to_ignore_on_load_unexpected``, which transformers loads
    without a word: the built model's own lists (Gemma-3n sets them per instance, one per layer that shares
    another's keys and values; ``post_init`` gathers the sub-models'), and the multi-token-prediction layers
    a config announces (``num_nextn_predict_layers``: DeepSeek-V3 stores them as the layers after
    ``num_hidden_layers``, where transformers' own pattern names only the full model's ``model.layers.61``)."""
    out: list[str] = []
    for _, module in model.named_modules():
        out.extend(str(p) for p in getattr(module, "_keys_to_ignore_on_load_unexpected", None) or ())
    config = getattr(model, "config", None)
    layers, nextn = (
        getattr(config, name, None) for name in ("num_hidden_layers", "num_nextn_predict_layers")
    )
    if type(layers) is int and type(nextn) is int and 0 < nextn <= 64:
        out.append(rf"(^|\.)layers\.({'|'.join(str(layers + i) for i in range(nextn))})\.")
    return sorted(set(out))


def _converted(model: torch.nn.Module) -> list[str]:
    """Regular expressions of the checkpoint names whose values transformers converts when it loads ``model``
    (``transformers.conversion_mapping``'s weight converters, transformers 5; none before)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter

        transforms = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    except Exception:  # an older transformers, or one that changed this: nothing is excused
        return []
    out = []
    for t in transforms:
        pattern = getattr(getattr(t, "compiled_sources", None), "pattern", None)
        if isinstance(t, WeightConverter) and isinstance(pattern, str):
            pattern = re.sub(r"\(\?P<\w+>", "(?:", pattern)  # its named groups: unnamed, to join several
            scope = getattr(t, "scope_prefix", None)
            out.append(f"{re.escape(scope)}\\..*(?:{pattern})" if scope else pattern)
    return out


@functools.cache
def _rules_hash() -> str:
    """A hash of the code that fills a ModuleInfo: a changed rule invalidates what older code remembered."""
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:16]


@functools.cache
def _transformers_version() -> str:
    """The installed transformers' version, read once per process (reading its metadata takes about 1 ms,
    which every opened checkpoint would pay). Raises ``importlib.metadata.PackageNotFoundError``."""
    return importlib.metadata.version("transformers")


def _cache_file(arch: str, config: dict[str, Any]) -> pathlib.Path | None:
    """The file that remembers the model of ``config``: named by a hash of the config, of the versions of
    what builds and reads the model (transformers, torch, qbridge) and of the rules in this file."""
    import qbridge

    root = cache_dir()
    if root is None:
        return None
    try:
        versions = [_transformers_version(), torch.__version__, qbridge.__version__]
        text = json.dumps([_rules_hash(), arch, versions, config], sort_keys=True, default=repr)
    except (importlib.metadata.PackageNotFoundError, OSError, TypeError, ValueError):
        return None
    return root / "modules" / f"{hashlib.sha256(text.encode()).hexdigest()}.json"


def _strings(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise TypeError(f"{what} must map names to names")
    return value


def _read_info(path: pathlib.Path | None, arch: str) -> ModuleInfo | None:
    """The ModuleInfo remembered at ``path``, or None (absent, damaged, or not what this code writes: then
    the model is built again and the file rewritten)."""
    if path is None:
        return None
    try:
        if not path.is_file():  # OSError for a directory this user cannot search or a name too long
            return None
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("architecture") != arch:
            raise ValueError("not a record of this architecture")
        kinds = _strings(data["kinds"], "kinds")
        if not set(kinds.values()) <= set(jax_side.KINDS):
            raise ValueError(f"unknown module kinds {sorted(set(kinds.values()) - set(jax_side.KINDS))}")
        non_persistent = data["non_persistent"]
        if not isinstance(non_persistent, list) or not all(isinstance(k, str) for k in non_persistent):
            raise TypeError("non_persistent must be a list of names")
        shapes = data["shapes"]
        if not isinstance(shapes, dict) or not all(
            isinstance(v, list) and all(type(n) is int and n >= 0 for n in v) for v in shapes.values()
        ):
            raise TypeError("shapes must map names to lists of sizes")
        if kinds and set(shapes) != set(kinds):
            raise ValueError("shapes must name the tensors kinds names")
        patterns = [data["may_lack"], data["converted"], data["may_have"]]
        for found in patterns:
            if not isinstance(found, list) or not all(isinstance(p, str) for p in found):
                raise TypeError("may_lack, converted and may_have must be lists of patterns")
            for pattern in found:
                re.compile(pattern)
        info = ModuleInfo(
            arch,
            kinds,
            _strings(data["classes"], "classes"),
            set(non_persistent),
            _strings(data["tied"], "tied"),
            {str(k): tuple(v) for k, v in shapes.items()},
            *patterns,
        )
    except Exception as e:  # unreadable or damaged in any way (deep nesting included): built again
        log.debug("ignoring %s: %r", path, e)
        return None
    return info


def _write_info(path: pathlib.Path | None, info: ModuleInfo) -> None:
    if path is None:
        return
    data = dataclasses.asdict(info)
    data["non_persistent"] = sorted(info.non_persistent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
        partial.write_text(json.dumps(data))
        os.replace(partial, path)  # whole or absent, also with several processes writing
    except OSError as e:  # a read-only home: built again next time
        log.debug("could not remember the model in %s: %s", path, e)


def _same_tensor(read: Any, a: str, b: str) -> bool:
    try:
        x, y = read(a), read(b)
    except Exception:
        return False
    return x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y))


def classify(
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
    quantized: set[str],
    config: dict[str, Any],
    read: Any,
    *,
    modules: ModuleInfo | None,
    modules_note: str,
) -> Classification:
    """Classifies checkpoint tensors (``key -> (shape, dtype)``; ``quantized``: the keys of quantized weights;
    ``read(key)`` gives a stored tensor, for the equality of tied copies)."""
    out = Classification(source=modules_note if modules is not None else f"name rules ({modules_note})")
    method = (config.get("quantization_config") or {}).get("quant_method")
    documented = NOT_WEIGHTS.get(str(method), {})
    tie = bool(config.get("tie_word_embeddings", True))
    for key, (shape, _) in shapes.items():
        leaf = key.rpartition(".")[2]
        if leaf in documented:
            out.optional[key] = documented[leaf]
            continue
        if modules is not None and key in modules.non_persistent:
            out.optional[key] = (
                f"buffer of {modules.classes.get(key, 'the model')} that the model does not save (a cache)"
            )
            continue
        if modules is None or key not in modules.kinds:
            reason = jax_side.buffer_reason(key, len(shape))
            if reason is not None:
                out.optional[key] = reason
                continue
        if modules is not None and key in modules.kinds:
            out.kinds[key] = modules.kinds[key]
            if modules.classes.get(key) == "Conv1D" and modules.kinds[key] == "hf_conv1d":
                out.conv1d.add(key)
        elif key.rpartition(".")[2] in ("weight", "running_mean", "running_var", "bias"):
            out.guessed.append(key)
    # tied copies: named by the model (or, without it, output-embedding names under tie_word_embeddings),
    # and equal to the tensor they copy
    if modules is not None:
        pairs = [
            (copy, source) for copy, source in modules.tied.items() if copy in shapes and source in shapes
        ]
    elif tie:

        def is_copy_name(k: str) -> bool:
            return k.endswith(OUTPUT_EMBEDDINGS) or k.endswith(
                ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
            )

        embeddings = [k for k in shapes if k not in quantized and len(shapes[k][0]) == 2 and k.endswith(".weight")
                      and jax_side.infer_kind(k, 2) == "embedding"]  # fmt: skip
        embeddings.sort(
            key=lambda k: (is_copy_name(k), len(k))
        )  # the shared table first (T5's shared, GPT-2's wte)
        pairs = [
            (copy, source) for copy in shapes if is_copy_name(copy) for source in embeddings if source != copy
        ]
    else:
        pairs = []
    sources: set[str] = set()
    tied_by = (
        f"the {modules.architecture} model" if modules is not None else "tie_word_embeddings in the config"
    )
    for copy, source in pairs:
        if copy in out.optional or copy in sources or source in out.optional:
            continue
        if (copy in quantized) != (source in quantized):
            which = copy if copy in quantized else source
            out.kept_tied.setdefault(copy, f"{tied_by} ties it to {source!r}, but the checkpoint stores {which!r} "
                                           "quantized and the other not")  # fmt: skip
            continue
        if copy in quantized:
            continue
        if shapes[copy] == shapes[source] and _same_tensor(read, copy, source):
            out.optional[copy] = f"tied to {source} (an identical copy)"
            sources.add(source)
            out.kinds.pop(copy, None)
            if copy in out.guessed:
                out.guessed.remove(copy)
            out.kept_tied.pop(copy, None)
        else:
            out.kept_tied.setdefault(
                copy, f"{tied_by} ties it to {source!r}, but the checkpoint holds different values"
            )
            if modules is not None:
                log.info(
                    "%s is tied to %s in %s, but the checkpoint holds different values: kept",
                    copy,
                    source,
                    modules.architecture,
                )
    return out


@dataclasses.dataclass
class ConfigMismatch:
    """Where a checkpoint differs from the torch model its ``config.json`` builds (on the meta device).

    Attributes:
        architecture: the model's class name (``config.json``'s ``architectures[0]``).
        missing: ``name -> torch shape`` of the model's parameters and saved buffers that the checkpoint
            lacks (tied copies, buffers the model does not save and what transformers lets a checkpoint lack
            aside).
        shapes: ``(key, the model's torch shape, the checkpoint's torch shape)`` for tensors of other sizes;
            a quantized weight's shape is its quant state's (bitsandbytes) or stored one (FP8, 8-bit).
        unexpected: the checkpoint's tensors named as the model names its own but with numbers it does not
            have (``model.layers.3...`` where the config's model has three layers; an expert the model names
            one by one), beyond what the model lets a checkpoint hold (``_keys_to_ignore_on_load_unexpected``,
            the multi-token-prediction layers a config announces). Experts stored one by one that transformers
            fuses as it loads (Mixtral's, in transformers 5) are named otherwise than the model's: not counted.
    """

    architecture: str
    missing: dict[str, tuple[int, ...]]
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]
    unexpected: list[str] = dataclasses.field(default_factory=list)

    def lines(self) -> list[str]:
        """Every mismatch in words, one line each: ``"missing: <key> (the model's [..])"``, then
        ``"other size: <key>: the model's [..], the checkpoint's [..]"``, then ``"not in the model: <key>"``."""
        return (
            [f"missing: {key} (the model's {list(shape)})" for key, shape in self.missing.items()]
            + [
                f"other size: {key}: the model's {list(model)}, the checkpoint's {list(stored)}"
                for key, model, stored in self.shapes
            ]
            + [f"not in the model: {key}" for key in self.unexpected]
        )

    def describe(self, limit: int = 8) -> str:
        """:meth:`lines` joined for a message, at most ``limit`` of each sort, then a count of the rest."""
        lines = self.lines()
        missing, shown = len(self.missing), lines[: min(limit, len(self.missing))]
        if missing > limit:
            shown.append(f"... and {missing - limit} more missing")
        shown += lines[missing : missing + min(limit, len(self.shapes))]
        if len(self.shapes) > limit:
            shown.append(f"... and {len(self.shapes) - limit} more of other sizes")
        shown += lines[missing + len(self.shapes) :][:limit]
        if len(self.unexpected) > limit:
            shown.append(f"... and {len(self.unexpected) - limit} more not in the model")
        return "\n  ".join(shown)

    def summary(self) -> str:
        """The counts in words: ``"1 tensor of the model missing, 2 tensors of other sizes"``."""
        parts = []
        if self.missing:
            n = len(self.missing)
            parts.append(f"{n} tensor{'s' if n != 1 else ''} of the model missing")
        if self.shapes:
            n = len(self.shapes)
            parts.append(f"{n} tensor{'s' if n != 1 else ''} of other sizes")
        if self.unexpected:
            n = len(self.unexpected)
            parts.append(f"{n} tensor{'s' if n != 1 else ''} the model does not have")
        return ", ".join(parts)


_NUMBERS = re.compile(r"\.\d+(?=\.|$)")  # a name's numbered parts (a layer's, an expert's index)


def _any_of(patterns: list[str]) -> re.Pattern[str] | None:
    """One regular expression that a name matches (searched) where it matches any of ``patterns``; None for
    none."""
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


def config_mismatches(
    shapes: dict[str, tuple[int, ...]], classification: Classification, modules: ModuleInfo | None
) -> ConfigMismatch | None:
    """How the checkpoint's tensors (``key -> torch shape``, after classification) differ from ``modules``,
    the torch model of its ``config.json``, or None where they agree or the model was not built.

    Sizes are compared for every parameter the model names. Missing tensors are looked for only where every
    parameter of the checkpoint has one of the model's names: one it does not name means the checkpoint
    follows another naming somewhere (another prefix, or a stored layout transformers converts when it
    loads, such as Mixtral's per-expert weights of a model that fuses them), where what looks missing may be
    stored under other names. Tied copies, buffers the model does not save, BatchNorm's ``num_batches_tracked``
    and the names the model lets a checkpoint lack (``_keys_to_ignore_on_save``,
    ``_keys_to_ignore_on_load_missing``) are never missing; a tensor transformers converts when it loads (a
    weight converter of ``transformers.conversion_mapping``: Qwen3-VL-MoE's experts, transposed in place)
    may hold the model's sizes in another order. A transformers ``Conv1D`` weight is compared as the
    ``[out, in]`` matrix the checkpoint's entry holds.

    A tensor the model does not name is unexpected where the model names one that differs from it in its
    numbers only (another layer, another expert: the config's counts are not the checkpoint's) and the model
    does not let a checkpoint hold it (``_keys_to_ignore_on_load_unexpected``); others (another naming) are
    not counted."""
    if modules is None or not modules.shapes:
        return None
    params = [key for key in shapes if key not in classification.optional]
    wrong: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    unknown: list[str] = []
    converted = _any_of(modules.converted)
    for key in params:
        model = modules.shapes.get(key)
        if model is None:
            unknown.append(key)
            continue
        if modules.classes.get(key) == "Conv1D" and len(model) == 2:
            model = model[::-1]
        stored = tuple(shapes[key])
        if stored != model and not (  # a converter's transpose in place: the same sizes in another order
            converted is not None and sorted(stored) == sorted(model) and converted.search(key)
        ):
            wrong.append((key, model, stored))
    unexpected: list[str] = []
    if unknown:  # named as the model names its tensors, with other numbers: counts the config does not give
        templates = {_NUMBERS.sub(".#", name) for name in modules.shapes}
        allowed = _any_of(modules.may_have)
        unexpected = [
            key for key in unknown
            if _NUMBERS.sub(".#", key) in templates and (allowed is None or not allowed.search(key))
        ]  # fmt: skip
    missing: dict[str, tuple[int, ...]] = {}
    if not unknown:  # the checkpoint names its tensors as the model does: what it lacks is missing
        shared = {source for copy, source in modules.tied.items() if copy in shapes}
        excused = _any_of(modules.may_lack)
        missing = {
            name: shape
            for name, shape in modules.shapes.items()
            if name not in shapes and name not in modules.non_persistent and name not in modules.tied
            and name not in shared and not name.endswith("num_batches_tracked")
            and (excused is None or not excused.search(name))
        }  # fmt: skip
    if not (missing or wrong or unexpected):
        return None
    return ConfigMismatch(modules.architecture, missing, wrong, unexpected)
