"""Fingerprints: the stable hashes that make the step cache invisible.

A step's fingerprint is a hash of (step class, its VERSION, its semantic parameters, its inputs' fingerprints).
Re-running a pipeline recomputes every fingerprint before any work; a step whose fingerprint already has a finished
output in the run directory is skipped, and a changed parameter changes that step's fingerprint and so every
descendant's. Runtime knobs and secrets are not hashed. A value we cannot hash deterministically raises
FingerprintError at check time: a random key would silently redo paid-for work (the weak spot of HF datasets).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from thresher.errors import FingerprintError


def _canonical(value: Any, where: str) -> Any:
    """Turn a parameter value into JSON-able data whose dump is the same in every process."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return {"__float__": repr(value)}
        return {"__float__": value.hex()}
    if isinstance(value, bytes):
        return {"__bytes__": hashlib.blake2b(value, digest_size=16).hexdigest()}
    if isinstance(value, enum.Enum):
        return {"__enum__": f"{type(value).__qualname__}.{value.name}"}
    if isinstance(value, os.PathLike):
        # as its text: Path("a.json") and "a.json" name the same file, and YAML recipes only ever hold strings
        return _canonical(os.fspath(value), where)
    if isinstance(value, Mapping):
        out = {}
        for k in value:
            if not isinstance(k, (str, int, float, bool)):
                raise FingerprintError(f"{where}: dict key {k!r} of type {type(k).__name__} cannot be fingerprinted")
            out[str(k)] = _canonical(value[k], f"{where}[{k!r}]")
        return {"__dict__": dict(sorted(out.items()))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [_canonical(v, f"{where}{{}}") for v in value]
        return {"__set__": sorted(json.dumps(i, sort_keys=True) for i in items)}
    if isinstance(value, type):  # before the checks below: a class has the methods its instances have
        return _class_identity(value, where)
    if hasattr(value, "fingerprint") and hasattr(value, "get_params"):  # a nested step
        return {"__step__": value.fingerprint()}
    if hasattr(value, "model_dump") and callable(value.model_dump):  # pydantic model
        return {"__model__": type(value).__qualname__, "v": _canonical(value.model_dump(), where)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            "__dataclass__": type(value).__qualname__,
            "v": _canonical({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where),
        }
    if isinstance(value, types.FunctionType):
        return {"__function__": _function_identity(value, where)}
    fp = getattr(value, "__thresher_fingerprint__", None)
    if callable(fp):
        return {"__custom__": fp()}
    raise FingerprintError(
        f"{where}: a value of type {type(value).__name__} cannot be fingerprinted; use plain data "
        "(str, numbers, lists, dicts, paths), or give the object a __thresher_fingerprint__() method"
    )


def _class_identity(cls: type, where: str) -> Any:
    """A pydantic model class by its JSON schema; any other class by module + qualname.

    A schema is what a judge, tagger or rewriter asks the model for (`response_format=MyModel`), so editing a field,
    a type or a description must re-run the step, while moving the class to another module need not. Validators
    that leave no trace in the schema do not count: change the step's VERSION when one changes what is kept. Other
    classes are taken by name only: editing such a class's code does not change the fingerprint.
    """
    schema = getattr(cls, "model_json_schema", None)
    if callable(schema):
        try:
            doc = schema()
        except Exception as e:  # pydantic raises several kinds (arbitrary types, unresolvable references)
            raise FingerprintError(
                f"{where}: pydantic model {cls.__qualname__} has no JSON schema, so it cannot be fingerprinted: {e}"
            ) from e
        return {"__schema__": _canonical(doc, f"{where} (schema of {cls.__qualname__})")}
    return {"__class__": f"{cls.__module__}.{cls.__qualname__}"}


def _function_identity(fn: types.FunctionType, where: str) -> Any:
    """Hash a function by its code and what it closes over, not by its id (which changes every process)."""
    code = fn.__code__
    closure = []
    for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=False):
        closure.append([name, _canonical(cell.cell_contents, f"{where} (closure variable {name!r})")])
    return {
        "name": f"{fn.__module__}.{fn.__qualname__}",
        **_code_identity(code),
        "closure": closure,
        "defaults": _canonical(list(fn.__defaults__ or ()), where),
        "kwdefaults": _canonical(fn.__kwdefaults__ or {}, where),
    }


def _code_identity(code: types.CodeType) -> dict[str, Any]:
    """A code object's bytecode, constants and global names; nested code (inner functions, lambdas, comprehensions
    before Python 3.12) is a constant of its parent and is hashed the same way, bytecode included."""
    return {
        "code": hashlib.blake2b(code.co_code, digest_size=16).hexdigest(),
        "consts": [_const_identity(k) for k in code.co_consts],
        "names": list(code.co_names),
    }


def _const_identity(k: Any) -> Any:
    if isinstance(k, types.CodeType):
        return _code_identity(k)
    if isinstance(k, (set, frozenset)):  # `x in {...}` compiles to a frozenset: its repr's order is PYTHONHASHSEED's
        return {"__set__": sorted(json.dumps(_const_identity(x), sort_keys=True) for x in k)}
    if isinstance(k, tuple):  # may hold sets or code
        return {"__tuple__": [_const_identity(x) for x in k]}
    return repr(k)  # str, bytes, numbers, None, Ellipsis: reprs that do not depend on the process


def stable_hash(value: Any, where: str = "value") -> str:
    """Hex digest of a value's canonical form; raises FingerprintError for values without one.

    Plain data hashes by value, functions by their code and closure, pydantic model classes by their JSON schema,
    other classes by module + qualname, objects by `__thresher_fingerprint__()`.
    """
    blob = json.dumps(_canonical(value, where), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.blake2b(blob.encode("utf-8"), digest_size=16).hexdigest()


_DIGESTS: dict[tuple[str, tuple[tuple[str, int, int], ...]], str] = {}


def _stat_key(p: Path) -> tuple[tuple[str, int, int], ...]:
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return tuple((str(f), (st := f.stat()).st_size, st.st_mtime_ns) for f in files)


def file_digest(path: str | os.PathLike[str], chunk_size: int = 1 << 22) -> str:
    """Content hash of a file (or of every file under a directory, in sorted order).

    Remembered per process while the files' sizes and modification times stay the same, so checking a pipeline
    and then running it reads a large input once, not twice.
    """
    p = Path(path)
    memo_key = (str(p.resolve()), _stat_key(p))
    if memo_key in _DIGESTS:
        return _DIGESTS[memo_key]
    digest = _file_digest(p, chunk_size)
    _DIGESTS[memo_key] = digest
    return digest


def _file_digest(p: Path, chunk_size: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(chunk_size):
                h.update(chunk)
    return h.hexdigest()
