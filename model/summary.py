"""`python -m model.summary PRESET [--a.b=value ...]`: the resolved config and the parameter count.

Prints the config (one `key = value` line each), a module-by-module parameter table (three levels
deep; repeated blocks are listed once with their count), and as the LAST line
`trainable_params=N`. An unknown preset or key exits with status 2 and the valid choices on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from model.config import Config, ConfigError, load_config

if TYPE_CHECKING:  # torch is imported only once a model is built, so a bad argument fails fast
    from torch import nn


def parameter_rows(module: nn.Module, max_depth: int = 3) -> Iterator[tuple[str, int, int]]:
    """(indented name, total params, trainable params) for every module down to `max_depth`."""
    from torch import nn

    def counts(m: nn.Module) -> tuple[int, int]:
        params = list(m.parameters())
        return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)

    def walk(m: nn.Module, name: str, depth: int) -> Iterator[tuple[str, int, int]]:
        yield ("  " * depth + name, *counts(m))
        if depth + 1 > max_depth:
            return
        has_children = any(True for _ in m.children())
        for pname, p in m.named_parameters(recurse=False) if has_children else ():  # e.g. pos_embed
            yield ("  " * (depth + 1) + pname, p.numel(), p.numel() if p.requires_grad else 0)
        for cname, child in m.named_children():
            if isinstance(child, nn.ModuleList) and len(child) > 0:
                total, trainable = counts(child)
                label = f"{cname} ({len(child)} x {type(child[0]).__name__})"
                yield ("  " * (depth + 1) + label, total, trainable)
            elif sum(p.numel() for p in child.parameters()) > 0:
                yield from walk(child, cname, depth + 1)

    yield from walk(module, type(module).__name__, 0)


def render(cfg: Config) -> str:
    """The full report for one config; its last line is `trainable_params=N`."""
    import torch

    from model.model import build_model, trainable_parameters

    with torch.device("meta"):  # shapes only: no memory, no initialisation cost, any size
        model = build_model(cfg.model)
    lines = [f"preset = {cfg.preset}"]
    lines += [f"{key} = {value!r}" for key, value in cfg.flat().items() if key != "preset"]
    lines += ["", f"{'module':<48} {'params':>12} {'trainable':>12}"]
    lines += [f"{name:<48} {total:>12,} {trainable:>12,}" for name, total, trainable in parameter_rows(model)]
    lines += ["", f"plan: {cfg.model.plan_len} x {cfg.model.embed_dim}"]
    lines.append(f"trainable_params={trainable_parameters(model)}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if args else 2
    try:
        cfg = load_config(args[0], args[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(render(cfg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
