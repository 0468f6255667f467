"""Steps: one subcommand each, built from the step function's signature; and the code each step runs.

A step is a function decorated with ``@step`` in the module of its concept. ``python -m workflow_scripts``
lists them and runs one; its arguments come from the signature:

* ``x: Path`` becomes ``--x PATH`` (required; optional when it has a default), ``x: list[Path]`` takes one or
  more paths (``--x P [P ...]``, zero or more when it defaults to an empty tuple);
* ``params: dict`` is ``--params JSON``, the slice of the config the step's outputs depend on;
* ``int``, ``float`` and ``str`` arguments are typed options.

The Snakefile finds the steps, and the files each one runs, without importing the package (so building the DAG
imports neither torch nor the step modules): ``find_steps`` and ``code_closure`` read the sources with ``ast``.
Each rule's ``code`` param is the hash of its step's import closure, so editing a module reruns exactly the
rules whose step imports it, directly or not.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import importlib
import inspect
import json
import logging
import os
import signal
import sys
import types
import typing
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
NAME = PACKAGE.name


def step(fn=None, name: str | None = None):
    """Mark ``fn`` as a step; its subcommand is its name with dashes, or ``@step(name="...")``."""

    def mark(f):
        f.__step__ = name or f.__name__.replace("_", "-")
        return f

    return mark(fn) if fn is not None else mark


# ----------------------------------------------------------------------------- reading the package's sources
@functools.cache  # read once per process, like the parsed trees below (the Snakefile asks for it once per rule)
def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name (relative to the package, '' for __init__) -> file."""
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


@functools.cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _step_name(node: ast.FunctionDef) -> str | None:
    """The subcommand of a function decorated with ``@step`` or ``@step(name="...")``, else None."""
    for dec in node.decorator_list:
        call = dec if isinstance(dec, ast.Call) else None
        target = call.func if call else dec
        if (isinstance(target, ast.Name) and target.id == "step") or (
            isinstance(target, ast.Attribute) and target.attr == "step"
        ):
            for kw in call.keywords if call else []:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    return kw.value.value
            return node.name.replace("_", "-")
    return None


def _find_steps(root: Path) -> dict[str, tuple[str, str, str]]:
    """``find_steps`` read from the sources."""
    out: dict[str, tuple[str, str, str]] = {}
    for mod, f in _modules(root).items():
        for node in _tree(f).body:
            name = _step_name(node) if isinstance(node, ast.FunctionDef) else None
            if name:
                if name in out:
                    raise RuntimeError(f"step {name} is defined twice: in {out[name][0]} and in {mod}")
                doc = (ast.get_docstring(node) or "").strip().split("\n\n")[0]
                out[name] = (mod, node.name, " ".join(doc.split()))
    return out


@functools.cache
def _index(root: Path = PACKAGE) -> dict:
    """What the Snakefile and the dispatcher read from the sources: the steps, each step's arguments and each
    module's package imports. Parsing every module takes about 0.5 s, paid by every Snakemake start and every job,
    so it is kept in ``root/__pycache__`` (as Python keeps its bytecode there) under the sha256 of every module's
    path and bytes: any edit to the package gives another key, and a file that does not load, or lacks a step or
    module, is ignored."""
    mods = _modules(root)
    h = hashlib.sha256()
    for mod, f in mods.items():
        h.update(mod.encode() + b"\0" + f.read_bytes() + b"\0")
    cache = root / "__pycache__" / f"steps.{h.hexdigest()[:32]}.json"
    try:
        kept = json.loads(cache.read_text())
        if kept.keys() == {"steps", "args", "imports"} and kept["args"].keys() == kept["steps"].keys() \
                and kept["imports"].keys() == mods.keys():
            return kept
    except (OSError, ValueError, AttributeError):
        pass
    index = _parse_index(root)
    try:  # written whole, then renamed; the keys of other versions of the package are dropped
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, cache)
        for old in cache.parent.glob("steps.*.json"):
            if old != cache:
                old.unlink(missing_ok=True)
    except OSError:  # a read-only install: parse again next time
        pass
    return index


def _parse_index(root: Path) -> dict:
    """``_index`` read from the sources."""
    steps = _find_steps(root)
    return {
        "steps": steps,
        "args": {name: _step_arguments(root, mod, func) for name, (mod, func, _) in steps.items()},
        "imports": {mod: _read_imports(root, mod) for mod in _modules(root)},
    }


@functools.cache
def find_steps(root: Path = PACKAGE) -> dict[str, tuple[str, str, str]]:
    """Subcommand -> (module, function, first paragraph of its docstring), read from the sources."""
    return {name: tuple(v) for name, v in _index(root)["steps"].items()}


@functools.cache
def step_arguments(step_name: str, root: Path = PACKAGE) -> dict[str, tuple[str, bool]]:
    """Argument -> (kind, required) of a step, read from its signature in the source as ``parser_for`` builds the
    command line from it: kind 'params' (``--params JSON``), 'path' (``x: Path``), 'paths' (``list[Path]``) or
    'value' (int, float, str). The Snakefile builds each rule's command line from it (rules/common.smk, ``step``)."""
    steps = find_steps(root)
    if step_name not in steps:
        raise KeyError(f"no step {step_name!r}; steps: {', '.join(sorted(steps))}")
    return {a: (kind, required) for a, (kind, required) in _index(root)["args"][step_name].items()}


def _step_arguments(root: Path, mod: str, func: str) -> dict[str, tuple[str, bool]]:
    node = next(n for n in _tree(_modules(root)[mod]).body if isinstance(n, ast.FunctionDef) and n.name == func)
    a = node.args
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults) + list(a.kw_defaults)
    out = {}
    for arg, default in zip(positional + a.kwonlyargs, defaults, strict=True):
        hint = ast.unparse(arg.annotation) if arg.annotation else "str"
        hint = hint.replace(" | None", "").replace("None | ", "")
        kind = ("params" if arg.arg == "params" else "paths" if hint in ("list[Path]", "tuple[Path, ...]")
                else "path" if hint == "Path" else "value")
        out[arg.arg] = (kind, default is None)
    return out


def _resolve(module: str, node: ast.ImportFrom | ast.Import, mods: dict[str, Path]) -> set[str]:
    """The package modules an import statement in ``module`` loads (parents' __init__ included)."""
    is_pkg = mods[module].name == "__init__.py"
    targets = []
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name == NAME or a.name.startswith(NAME + "."):
                targets.append(a.name[len(NAME) + 1 :])
    else:
        if node.level:
            base = module.split(".") if module else []
            base = base if is_pkg else base[:-1]
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        elif node.module and (node.module == NAME or node.module.startswith(NAME + ".")):
            prefix = node.module[len(NAME) + 1 :]
        else:
            return set()
        targets.append(prefix)
        targets += [f"{prefix}.{a.name}" if prefix else a.name for a in node.names]  # `from . import lm`
    out = set()
    for t in targets:
        parts = t.split(".") if t else []
        for i in range(len(parts) + 1):  # importing a.b runs a/__init__ too
            m = ".".join(parts[:i])
            if m in mods:
                out.add(m)
    return out


@functools.cache
def code_closure(step_name: str, root: Path = PACKAGE) -> tuple[Path, ...]:
    """The files a step runs: ``__main__``, this module, and the step's module with everything it imports from
    the package (at any depth, including imports inside functions)."""
    mods, steps = _modules(root), find_steps(root)
    if step_name not in steps:
        raise KeyError(f"no step {step_name!r}; steps: {', '.join(sorted(steps))}")
    todo, seen = ["__main__", "cli", "", steps[step_name][0]], set()
    while todo:
        m = todo.pop()
        if m in seen or m not in mods:
            continue
        seen.add(m)
        todo += [".".join(m.split(".")[:i]) for i in range(len(m.split(".")))]  # importing a.b runs a/__init__
        todo += _index(root)["imports"][m]
    return tuple(sorted(mods[m] for m in seen))


def _read_imports(root: Path, module: str) -> list[str]:
    """The package modules that ``module``'s import statements load, at any depth of its source."""
    mods = _modules(root)
    return sorted({t for node in ast.walk(_tree(mods[module])) if isinstance(node, ast.Import | ast.ImportFrom)
                   for t in _resolve(module, node, mods)})


def code_hash(step_name: str, root: Path = PACKAGE) -> str:
    """sha256 over the relative paths and bytes of the step's import closure (16 hex digits)."""
    h = hashlib.sha256()
    for f in code_closure(step_name, root):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- the command line
def _option(parser: argparse.ArgumentParser, p: inspect.Parameter, hint) -> None:
    flag = "--" + p.name.replace("_", "-")
    required = p.default is inspect.Parameter.empty
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # `Path | None`: an optional path
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if p.name == "params":
        parser.add_argument(
            flag,
            required=required,
            default=None if required else "{}",
            metavar="JSON",
            help="JSON object: the slice of the config this step's outputs depend on",
        )
    elif origin in (list, tuple):
        parser.add_argument(
            flag, nargs="+" if required else "*", type=Path, required=required, default=None if required else p.default,
            metavar="PATH",
        )
    elif hint is Path:
        parser.add_argument(flag, type=Path, required=required, default=None if required else p.default, metavar="PATH")
    elif hint in (int, float, str):
        default = p.default if not required else None
        if p.name == "threads":
            default = int(os.environ.get("SNAKEMAKE_THREADS", p.default if not required else 1))
            required = False
        parser.add_argument(flag, type=hint, required=required, default=default)
    else:
        raise TypeError(f"step argument {p.name}: no command-line form for {hint!r}")


def parser_for(fn) -> argparse.ArgumentParser:
    doc = inspect.getdoc(fn) or ""
    parser = argparse.ArgumentParser(
        prog=f"python -m {NAME} {fn.__step__}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(fn)
    for p in inspect.signature(fn).parameters.values():
        _option(parser, p, hints.get(p.name, str))
    return parser


def _top_parser(steps) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {NAME}",
        description="Run one step of the pipeline by hand (each Snakemake rule runs one). "
        f"`python -m {NAME} <step> --help` lists the step's arguments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="step", metavar="<step>", required=True)
    for name, (mod, _, doc) in sorted(steps.items()):
        sub.add_parser(name, help=f"{doc} [{mod or NAME}]".replace("%", "%%"), add_help=False)
    return parser


class Stopped(BaseException):
    """SIGTERM or SIGHUP (a job killed by Snakemake or Slurm, a closed terminal), raised in the step so that its
    ``finally`` blocks run: ``atomic_path`` removes the temp file of the output being written. (Python's default
    for these signals ends the process at once, leaving a temp file as large as the output.)"""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a second signal must not interrupt the cleanup
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = find_steps()
    if not argv or argv[0] not in steps:
        _top_parser(steps).parse_args(argv[:1])  # prints the list of steps, or says which step is unknown
        return 2
    mod, func, _ = steps[argv[0]]
    fn = getattr(importlib.import_module(f"{NAME}.{mod}" if mod else NAME), func)
    parser = parser_for(fn)
    args = vars(parser.parse_args(argv[1:]))
    if "params" in args:
        try:
            args["params"] = json.loads(args["params"])
        except json.JSONDecodeError as e:
            parser.error(f"--params is not valid JSON: {e}")
        if not isinstance(args["params"], dict):
            parser.error("--params must be a JSON object")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    try:
        fn(**args)
    except (ValueError, OSError, RuntimeError) as e:  # OSError: also a full disk, not only a missing file
        logging.getLogger(NAME).error("%s failed: %s", argv[0], e)
        print(f"error: {argv[0]}: {e}", file=sys.stderr)
        return 1
    except Stopped as e:
        name = signal.Signals(e.signum).name
        print(f"error: {argv[0]}: stopped by {name}; its temp files were removed", file=sys.stderr)
        return 128 + e.signum
    return 0
