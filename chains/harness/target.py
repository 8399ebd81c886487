"""The user's own workflow as a measurement target: find it, import it, make it a runnable.

A target is named as LangGraph's ``langgraph.json`` names graphs:

- an import path, ``pkg.module:graph``;
- a file path, ``./app/graph.py:graph`` (its folder is put on ``sys.path`` while it loads, for its siblings);
- a graph name from a ``langgraph.json`` (in the current folder, or the one given).

The object found is used as it is when it is a LangChain runnable (a compiled graph, an LCEL chain); a plain
function is taken for a factory and called with the chat model bound to the trial's engine.

Example:
    >>> load_target("langchain_core.runnables:RunnablePassthrough")  # doctest: +ELLIPSIS
    <class '...RunnablePassthrough'>
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langchain_core.runnables import Runnable

from langchain_energy.errors import ConfigError


def first_line(exc: BaseException) -> str:
    """``Type: the first line of the message``: an error of the user's code, fit for a one-line report."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _from_langgraph_json(name: str, config: Path) -> str:
    """The ``path.py:attr`` that ``config`` gives graph ``name``, as a path from the current folder."""
    try:
        graphs = json.loads(config.read_text()).get("graphs", {})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {config}: {first_line(exc)}") from None
    if name not in graphs:
        raise ConfigError(f"target {name!r} is not a graph of {config} (it has: {', '.join(graphs) or 'none'})")
    path, sep, attr = str(graphs[name]).partition(":")
    return f"{(config.parent / path).resolve()}{sep}{attr}"


def _load_file(path: Path, attr: str, spec: str) -> Any:
    module_name = f"_energy_target_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_file_location(module_name, path)
    if loader is None or loader.loader is None:
        raise ConfigError(f"target {spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(loader)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # the app imports its sibling modules, as under `langgraph dev`
    sys.modules[module_name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module is a bad target
        sys.modules.pop(module_name, None)
        raise ConfigError(f"cannot import target {spec!r}: {first_line(exc)}") from None
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
    return _attribute(module, attr, spec)


def _attribute(module: Any, attr: str, spec: str) -> Any:
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"target {spec!r}: {getattr(module, '__name__', 'module')} has no {attr!r}") from None
    return obj


def locate_target(spec: str, config: str | Path | None = None) -> str:
    """``spec`` as ``where:attr``, checked without running the user's code (the file or module exists).

    Run before an engine starts, so a typo costs no engine start; importing comes later, once the engine's
    address is in the environment.

    Raises:
        ConfigError: an empty or malformed target, a graph name no ``langgraph.json`` has, a missing file or
            module.
    """
    spec = spec.strip()
    if not spec:
        raise ConfigError("the target is empty; give pkg.module:graph, ./file.py:graph or a langgraph.json graph name")
    if ":" not in spec:
        spec = _from_langgraph_json(spec, Path(config) if config else Path("langgraph.json"))
    where, _, attr = spec.rpartition(":")
    if not where or not attr:
        raise ConfigError(f"target {spec!r} is malformed; write pkg.module:graph or ./file.py:graph")
    if _is_file(where):
        if not Path(where).is_file():
            raise ConfigError(f"target {spec!r}: no file {where}")
        check_source(Path(where), spec, sibling_folder=Path(where).resolve().parent)
        return spec
    try:
        found = importlib.util.find_spec(where)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"cannot import target {spec!r}: {first_line(exc)}") from None
    if found is None:
        raise ConfigError(f"cannot import target {spec!r}: no module named {where!r}")
    if found.origin and found.origin.endswith(".py") and Path(found.origin).is_file():
        check_source(Path(found.origin), spec)
    return spec


def check_source(path: Path, spec: str, sibling_folder: Path | None = None) -> None:
    """Refuse a target whose source cannot import, without running it: a syntax error, or a module it imports
    at its top level (outside ``try``) that is not installed (nor, for a file, a sibling of it).

    What only running the module can tell (an error it raises while loading) is found when it is imported.

    Raises:
        ConfigError: ``cannot import target ...`` naming the line.
    """
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"cannot import target {spec!r}: SyntaxError: {exc.msg} ({path.name}, line {exc.lineno})") \
            from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot import target {spec!r}: {first_line(exc)}") from None
    for node in tree.body:  # module level only: imports inside try or functions may be optional
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        for name in names:
            top = name.split(".")[0]
            if sibling_folder is not None and ((sibling_folder / f"{top}.py").is_file()
                                               or (sibling_folder / top).is_dir()):
                continue
            try:
                found = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                found = None
            if found is None:
                raise ConfigError(f"cannot import target {spec!r}: no module named {top!r} "
                                  f"({path.name}, line {node.lineno})")


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def load_target(spec: str, config: str | Path | None = None) -> Any:
    """The object that ``spec`` names (see the module docstring for the three forms).

    Args:
        spec: ``pkg.module:attr``, ``path/file.py:attr`` or a graph name of a ``langgraph.json``.
        config: the ``langgraph.json`` for graph names (default: the one in the current folder).

    Raises:
        ConfigError: the module or file cannot be found or imported, or has no such attribute (one line).
    """
    spec = locate_target(spec, config)
    where, _, attr = spec.rpartition(":")
    if _is_file(where):
        return _load_file(Path(where), attr, spec)
    try:
        module = importlib.import_module(where)
    except Exception as exc:  # noqa: BLE001 - ImportError, or any error the module raises while loading
        raise ConfigError(f"cannot import target {spec!r}: {first_line(exc)}") from None
    return _attribute(module, attr, spec)


def as_runnable(obj: Any, model: Callable[[], Any], name: str) -> Runnable:
    """``obj`` as a runnable: itself, or what a factory builds from the trial's chat model.

    Args:
        obj: what :func:`load_target` found.
        model: builds the chat model bound to the trial's engine (called only for a factory).
        name: the target's name, for errors.

    Raises:
        ConfigError: ``obj`` is neither a runnable nor a function returning one.
    """
    if isinstance(obj, Runnable):
        return obj
    if callable(obj) and not isinstance(obj, type):
        try:
            built = obj(model())
        except Exception as exc:  # noqa: BLE001 - the user's factory failed
            raise ConfigError(f"target {name!r}: the factory failed: {first_line(exc)}") from None
        if isinstance(built, Runnable):
            return built
        raise ConfigError(f"target {name!r}: the factory returned {type(built).__name__}, not a runnable")
    raise ConfigError(f"target {name!r} is a {type(obj).__name__}, not a runnable nor a function that returns one")
