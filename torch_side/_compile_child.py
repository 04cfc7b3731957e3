"""The compile process of ``_compile``: compiles kernel variants into Triton's cache, without a GPU.

Reads ``{"capability": 90, "variants": [spec, ...]}`` (``_compile.describe``) on stdin and compiles each
variant for that CUDA architecture the way a launch would (Triton's own binding and specialization, on
stand-in arguments), so the caller's process finds it in the cache, and writes the variant's record (its
``"record"``), so that later processes find it even when the asking one has ended. Prints one line per
variant: the cache hash Triton gave it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import torch


class CompileOnlyDriver:
    """Just enough of Triton's active driver for binding and compiling for a given architecture."""

    def __init__(self, capability: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


@contextlib.contextmanager
def compile_only(capability: int) -> Iterator[None]:
    """Makes Triton compile (never launch) for CUDA ``capability`` (e.g. 90) inside the block."""
    from triton.runtime.driver import driver

    previous = driver._active
    driver.set_active(CompileOnlyDriver(capability))
    try:
        yield
    finally:
        driver._active = previous


def stand_in_args(spec: dict[str, Any]) -> tuple[Any, ...]:
    from torch_side._compile import StandIn

    args: list[Any] = []
    for kind, *rest in spec["args"]:
        if kind == "t":
            args.append(StandIn(getattr(torch, rest[0]), bool(rest[1])))
        elif kind == "f":
            args.append(float(rest[0]))
        else:
            args.append(int(rest[0]))
    return tuple(args)


def compile_variant(spec: dict[str, Any]) -> Any:
    """Compiles one described variant with the active driver; returns Triton's compiled kernel."""
    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    return kernel.warmup(*stand_in_args(spec), grid=(1,), **spec["meta"])


def main() -> None:
    from torch_side._compile import write_record

    request = json.load(sys.stdin)
    with compile_only(int(request["capability"])):
        for spec in request["variants"]:
            compiled = compile_variant(spec)
            if spec.get("record"):  # recorded here: the asking process may have ended (a script's one load)
                write_record(pathlib.Path(spec["record"]))
            try:
                print(compiled.hash, flush=True)
            except OSError:  # the asking process has ended (a broken pipe): the other variants still compile
                sys.stdout = open(os.devnull, "w")  # for the rest of this process


if __name__ == "__main__":
    main()
