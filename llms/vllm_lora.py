"""LoRA adapters loaded into a running vLLM server at run time, so a trained adapter answers without a restart.

vLLM serves an adapter under its own model name once `POST /v1/load_lora_adapter {lora_name, lora_path}` has
loaded it; the server must run with `--enable-lora` (and `--max-lora-rank` at least the adapter's rank) and the
environment variable `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, and `lora_path` must be a folder the server can read
(same machine or a shared filesystem). Loading a name that is already loaded is not an error here: a resumed run
loads again what the server may still hold.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from thresher.errors import BackendError, ConfigError


def load_lora_adapter(server: Mapping[str, Any], name: str, adapter_dir: str | Path, *, timeout: float = 300.0) -> dict[str, Any]:
    """Load `adapter_dir` into the vLLM server of the backend spec `server` (base_url, model, api_key_env, ...)
    under `name`; returns the spec that asks for it (`server` with model=name)."""
    from thresher.llms.http import _httpx

    base_url = server.get("base_url")
    if not base_url:
        raise ConfigError(f"vLLM LoRA serving needs the server's base_url, got spec {dict(server)!r}")
    path = Path(adapter_dir).resolve()
    if not (path / "adapter_config.json").is_file():
        raise ConfigError(f"{path}: not a LoRA adapter folder (no adapter_config.json)")
    headers = {}
    key_env = server.get("api_key_env")
    if key_env and os.environ.get(str(key_env)):
        headers["Authorization"] = f"Bearer {os.environ[str(key_env)]}"
    url = str(base_url).rstrip("/") + "/load_lora_adapter"
    httpx = _httpx()
    try:
        r = httpx.post(url, json={"lora_name": name, "lora_path": str(path)}, headers=headers, timeout=timeout)
    except httpx.HTTPError as e:
        raise BackendError(f"loading LoRA adapter {name!r} into {base_url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200 and not (r.status_code == 400 and "already" in r.text.lower()):
        hint = (" (is the server running with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True?)"
                if r.status_code in (404, 405) else "")  # fmt: skip
        raise BackendError(f"loading LoRA adapter {name!r} from {path} into {base_url}: HTTP {r.status_code}: "
                           f"{r.text[:300]}{hint}")  # fmt: skip
    return {**server, "model": name}
