"""A one-time check, in a child process, that the installed llama.cpp library can run on this CPU.

Why: llama-cpp-python builds llama.cpp from source, by default for the build machine's CPU (`GGML_NATIVE=ON`). A
wheel built elsewhere, or ggml's AMX kernels on a CPU (or VM) that lists `amx_tile` without enabling it, dies with
`Illegal instruction` inside `llama_decode`: the Python process is killed with no exception and no message.

How: before the first in-process load, a child (`sys.executable -c ...`) imports the same `llama_cpp` package, loads
a model with a tiny context and decodes a few tokens. A child killed by a signal or failing becomes a `BackendError`
that names the library, the signal and the CPU flags and gives the rebuild command. The outcome is remembered per
key — the llama_cpp package's library files (path, size, mtime), the probe model's file and a digest of the CPU's
flags, so a home directory shared by different machines never reuses another CPU's answer — in this process and in a
small JSON file (`$THRESHER_PROBE_CACHE`, else `$XDG_CACHE_HOME/thresher/llama-probe.json`, else
`~/.cache/thresher/llama-probe.json`), written atomically. Later processes with the same key start no child. A
deterministic crash (SIGILL, SIGSEGV, ...) is remembered too; a timeout or a failing exit is not (it may be
transient). Rebuilding the library changes its files, hence the key. `THRESHER_SKIP_LLAMA_PROBE=1` skips the check.

Nothing here imports llama_cpp into this process.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from thresher.errors import BackendError, ConfigError

PROBE_VERSION = 1
# What the README's install command passes: a build that runs on any x86-64 CPU with AVX2, AMX or not.
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
# x86 CPU flags that decide which ggml kernels can run (the ones the message shows).
RELEVANT_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
)  # fmt: skip
# Deaths that the same library on the same CPU repeats every time; SIGKILL (the OOM killer) and SIGTERM are not.
_DETERMINISTIC = {"SIGILL", "SIGSEGV", "SIGBUS", "SIGFPE", "SIGABRT", "SIGSYS"}
_WINDOWS_CRASHES = {0xC000001D: "STATUS_ILLEGAL_INSTRUCTION", 0xC0000005: "STATUS_ACCESS_VIOLATION",
                    0xC0000096: "STATUS_PRIVILEGED_INSTRUCTION"}  # fmt: skip
_KEEP_ENTRIES = 64

# The child: no core file, a Python traceback on a fatal signal (faulthandler re-raises it, so the exit status still
# names the signal), the llama.cpp build's feature list, then a load and a short decode.
_CHILD = r"""
import faulthandler, json, sys
try:
    import resource
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
except Exception:
    pass
faulthandler.enable()
sys.path[:0] = json.loads(sys.argv[1])
model, threads = sys.argv[2], int(sys.argv[3])
import llama_cpp
try:
    print("SYSTEM_INFO " + llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(), flush=True)
except Exception:
    pass
llm = llama_cpp.Llama(model_path=model, n_ctx=128, n_batch=128, n_threads=threads, n_threads_batch=threads,
                      verbose=False)
llm.create_completion("The three primary colours are red, blue and", max_tokens=3, temperature=0)
print("PROBE_OK", flush=True)
"""


@dataclass(frozen=True)
class ProbeResult:
    """What the probe found: `ok`, where the answer came from (`child`, `file`, `process` or `skipped`), and for a
    failure the signal that killed the child (None: it exited or hung) and the message for the user."""

    ok: bool
    source: str
    key: str
    signal: str | None = None
    message: str = ""

    @property
    def deterministic(self) -> bool:
        """True when the same library, CPU and model give the same answer every time (worth remembering)."""
        return self.ok or (
            self.signal is not None and (self.signal in _DETERMINISTIC or self.signal.startswith("STATUS_"))
        )


def default_probe_cache() -> Path:
    if os.environ.get("THRESHER_PROBE_CACHE"):
        return Path(os.environ["THRESHER_PROBE_CACHE"]).expanduser()
    from thresher.paths import user_cache_dir

    return user_cache_dir() / "llama-probe.json"


def probe_skipped_by_env() -> bool:
    return os.environ.get("THRESHER_SKIP_LLAMA_PROBE", "").strip().lower() not in ("", "0", "false", "no")


def _cpuinfo(*fields: str) -> str | None:
    """The first `field : value` line of /proc/cpuinfo for one of `fields` (None off Linux)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(fields):
                return line.partition(":")[2].strip()
    return None


def cpu_flags() -> list[str]:
    """The CPU's feature flags (Linux: /proc/cpuinfo), sorted; empty where the platform does not list them."""
    return sorted(set((_cpuinfo("flags", "Features") or "").split()))


def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_digest() -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{platform.machine()}|{platform.processor()}|{' '.join(cpu_flags())}".encode())
    return h.hexdigest()


def portable_cmake_args(flags: Sequence[str] | None = None) -> str:
    """`CMAKE_ARGS` for a build that runs here: the README's x86-64 flags, less those this CPU lacks."""
    flags = cpu_flags() if flags is None else list(flags)
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return "-DGGML_NATIVE=OFF"
    if not flags:  # not Linux: no flag list to trim by
        return PORTABLE_CMAKE_ARGS
    have = set(flags)
    parts = ["-DGGML_NATIVE=OFF"] + [
        f"-DGGML_{f.upper()}=ON" for f in ("avx", "avx2", "fma", "f16c", "bmi2") if f in have
    ]
    return " ".join(parts)


def rebuild_command(python: str | None = None) -> str:
    import importlib.metadata  # here, not at import: it costs ~25 ms

    try:
        spec = f"llama-cpp-python=={importlib.metadata.version('llama-cpp-python')}"
    except importlib.metadata.PackageNotFoundError:
        spec = "llama-cpp-python"
    return (
        f'CMAKE_ARGS="{portable_cmake_args()}" {python or sys.executable} -m pip install '
        f'--force-reinstall --no-cache-dir --no-deps "{spec}"'
    )


def locate_llama_cpp(extra_path: Sequence[str | os.PathLike[str]] = ()) -> Path | None:
    """The `llama_cpp` package directory this process would import (found without importing it), or None."""
    if extra_path:
        spec = importlib.machinery.PathFinder.find_spec("llama_cpp", [*map(str, extra_path), *sys.path])
    else:
        spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def library_files(package_dir: Path) -> list[Path]:
    """The shared libraries llama_cpp loads (`$LLAMA_CPP_LIB_PATH` or its `lib/` folder), and its `__init__.py`."""
    lib_dir = Path(os.environ["LLAMA_CPP_LIB_PATH"]) if os.environ.get("LLAMA_CPP_LIB_PATH") else package_dir / "lib"
    libs = []
    if lib_dir.is_dir():
        libs = sorted(
            p for p in lib_dir.iterdir() if p.is_file() and (".so" in p.name or p.suffix in (".dylib", ".dll"))
        )
    return [*libs, package_dir / "__init__.py"]


def probe_key(package_dir: Path, model: Path) -> str:
    parts: list[Any] = [PROBE_VERSION, cpu_digest()]
    for p in [*library_files(package_dir), model]:
        with contextlib.suppress(OSError):
            st = p.stat()
            parts.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).hexdigest()


def _read_memo(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


def _write_memo(path: Path, key: str, entry: dict[str, Any]) -> None:
    """Adds one entry (re-reading the file first, so other processes' entries survive); atomic; best effort."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_memo(path)
        entries[key] = entry
        keep = sorted(entries.items(), key=lambda kv: kv[1].get("checked", 0))[-_KEEP_ENTRIES:]
        fd, tmp = tempfile.mkstemp(prefix=".llama-probe-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": PROBE_VERSION, "entries": dict(keep)}, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:  # a read-only home: the probe still protected this process; the next one probes again
        pass


_process_memo: dict[tuple[str, str], ProbeResult] = {}
_lock = threading.Lock()


def _signal_name(rc: int) -> str | None:
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return _WINDOWS_CRASHES.get(rc & 0xFFFFFFFF)


def _crash_site(stderr: str) -> str:
    """The innermost Python frame of a faulthandler dump (`File ".../_internals.py", line 312 in decode`)."""
    for line in stderr.splitlines():
        if line.strip().startswith('File "'):
            return line.strip()
    return ""


def _describe(
    sig: str | None, rc: int, out: str, err: str, package_dir: Path, model: Path, memo: Path, remembered: bool
) -> str:
    libs = [p for p in library_files(package_dir) if p.name != "__init__.py"]
    libs = [p for p in libs if p.name.endswith((".so", ".dylib", ".dll"))] or libs  # not the .so.0 copies
    lib = next((p for p in libs if p.name.startswith("libllama")), libs[0] if libs else package_dir / "__init__.py")
    flags = [f for f in RELEVANT_FLAGS if f in set(cpu_flags())]
    built = next((ln[len("SYSTEM_INFO ") :] for ln in out.splitlines() if ln.startswith("SYSTEM_INFO ")), "")
    if sig is not None:
        what = f"was killed by {sig}"
        if sig in ("SIGILL", "STATUS_ILLEGAL_INSTRUCTION"):
            what += (
                " (illegal instruction): the library was compiled for instructions this CPU does not run — llama-cpp-"
                "python builds for the build machine's CPU by default, and ggml's AMX kernels die where a CPU or VM "
                "lists amx_tile without enabling it"
            )
    else:
        tail = " | ".join(err.strip().splitlines()[-3:])
        what = f"failed (exit status {rc}): {tail or 'no error output'}"
    site = _crash_site(err)
    lines = [
        f"llama.cpp cannot run in this process: a probe process that loaded {model.name} with {lib} {what}.",
        f"Library: {package_dir} ({', '.join(p.name for p in libs) or 'no shared libraries found'})"
        + (f"; built with: {built}" if built else ""),
        f"CPU: {cpu_model()}; flags: {' '.join(flags) or 'not listed'}.",
    ]
    if site:
        lines.append(f"Died in: {site}")
    lines.append(f"Rebuild llama-cpp-python for this CPU (portable flags, no cached wheel):\n    {rebuild_command()}")
    if remembered:
        lines.append(f"(Remembered in {memo} until the library changes; delete that file to probe again.)")
    return "\n".join(lines)


def probe_llama_cpp(
    model: str | os.PathLike[str],
    *,
    extra_path: Sequence[str | os.PathLike[str]] = (),
    memo_path: str | os.PathLike[str] | None = None,
    threads: int = 2,
    timeout: float = 300.0,
) -> ProbeResult:
    """Checks, once per library, CPU and model, that llama.cpp loads `model` and decodes without dying.

    extra_path: folders searched for `llama_cpp` before `sys.path` (tests point it at a fake package).
    memo_path: the JSON file of remembered results (default `default_probe_cache()`).
    """
    model = Path(model)
    memo = Path(memo_path) if memo_path is not None else default_probe_cache()
    package_dir = locate_llama_cpp(extra_path)
    if package_dir is None:
        raise ConfigError("LlamaCpp needs llama-cpp-python: pip install 'thresher[llm]'")
    key = probe_key(package_dir, model)
    with _lock:
        if (str(memo), key) in _process_memo:
            return replace(_process_memo[(str(memo), key)], source="process")
        entry = _read_memo(memo).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("ok"), bool):
            result = ProbeResult(entry["ok"], "file", key, entry.get("signal"), str(entry.get("message", "")))
        else:
            result = _run_child(package_dir, model, memo, key, extra_path, threads, timeout)
        if result.deterministic:
            _process_memo[(str(memo), key)] = result
        return result


def _run_child(
    package_dir: Path,
    model: Path,
    memo: Path,
    key: str,
    extra_path: Sequence[str | os.PathLike[str]],
    threads: int,
    timeout: float,
) -> ProbeResult:
    path = [str(package_dir.parent), *map(str, extra_path)]
    args = [sys.executable, "-c", _CHILD, json.dumps(path), str(model), str(max(1, threads))]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return ProbeResult(
            False,
            "child",
            key,
            None,
            f"llama.cpp probe: loading {model.name} with {package_dir} in a child process did not finish in "
            f"{timeout:.0f} s (a loaded machine?). Set THRESHER_SKIP_LLAMA_PROBE=1 to skip the check.",
        )
    if proc.returncode == 0 and "PROBE_OK" in proc.stdout:
        _write_memo(memo, key, {"ok": True, "checked": time.time(), "library": str(package_dir)})
        return ProbeResult(True, "child", key)
    sig = _signal_name(proc.returncode)
    result = ProbeResult(False, "child", key, sig)
    message = _describe(sig, proc.returncode, proc.stdout, proc.stderr, package_dir, model, memo, result.deterministic)
    if result.deterministic:
        entry = {"ok": False, "checked": time.time(), "library": str(package_dir), "signal": sig, "message": message}
        _write_memo(memo, key, entry)
    return replace(result, message=message)


def ensure_llama_cpp_runs(model: str | os.PathLike[str], **options: Any) -> ProbeResult:
    """`probe_llama_cpp(model, **options)`, raising `BackendError` with what happened and how to rebuild when
    llama.cpp cannot run here; `THRESHER_SKIP_LLAMA_PROBE=1` skips it."""
    if probe_skipped_by_env():
        return ProbeResult(True, "skipped", "")
    r = probe_llama_cpp(model, **options)
    if not r.ok:
        raise BackendError(f"LlamaCpp: {r.message}")
    return r
