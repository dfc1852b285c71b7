"""The Files and Batches endpoints of the scripted test server (`thresher.llms.testing`), enough of OpenAI's Batch API
for tests to drive every path of `thresher.llms.batch` against a real HTTP server.

    POST /v1/files (multipart: purpose, file)   GET /v1/files/{id}, /v1/files/{id}/content
    POST /v1/batches {input_file_id, endpoint, completion_window}   GET /v1/batches[?limit=], /v1/batches/{id}
    POST /v1/batches/{id}/cancel

Upload limits are the server's `batch_max_requests` lines and `batch_max_bytes` bytes per file (a larger file gets a
400, as OpenAI's API does). A job validates its file when created (JSON lines, unique custom_ids, method POST, url =
the job's endpoint, a model in each body; otherwise it ends `failed` with the line numbers). It says `in_progress` to
its first `batch_polls` - 1 status polls and finishes on the next one, as `batch_outcome` says: `completed` (every
line answered), `expired` (the first half answered, the rest `batch_expired` error lines), `failed` (none answered,
as when the API refuses a file; the job's `errors` say why). A cancelled job ends
`cancelled` with the first half answered. Each line is answered like an online request (scripted rules, the echo,
`[[fail]]` -> a 500 error line, `[[400]]` -> a 400 error line); lines of a finished job count in `stats()["batch_lines"]`.
Jobs and files outlive `reset()`, so a test can kill a client and start another that finds its jobs.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUTCOMES = ("completed", "expired", "failed")


def parse_multipart(raw: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """name -> (filename, content) of a multipart/form-data body."""
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if m is None:
        raise ValueError("multipart body without a boundary")
    out: dict[str, tuple[str | None, bytes]] = {}
    for part in raw.split(b"--" + m.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, body = part.partition(b"\r\n\r\n")
        disp = head.decode("latin-1")
        name = re.search(r'name="([^"]*)"', disp)
        filename = re.search(r'filename="([^"]*)"', disp)
        if name is not None:
            out[name.group(1)] = (filename.group(1) if filename else None, body[:-2] if body.endswith(b"\r\n") else body)
    return out


class BatchDesk:
    """Files and batch jobs of one server process. `answer(url, body)` -> (status, response body) answers one line."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.files: dict[str, dict[str, Any]] = {}
        self.content: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.private: dict[str, dict[str, Any]] = {}  # per job: polls, cancel flag, validation errors
        self.lines_answered = 0

    # ---- routing --------------------------------------------------------------------------------

    def handle(self, method: str, path: str, raw: bytes, headers: dict[str, str],
               answer: Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]) -> tuple[int, bytes]:  # fmt: skip
        route, _, query = path.partition("?")
        parts = [p for p in route.split("/") if p and p != "v1"]
        try:
            if parts == ["files"] and method == "POST":
                return self._upload(raw, headers.get("content-type", ""))
            if len(parts) >= 2 and parts[0] == "files" and method == "GET":
                if parts[1] not in self.files:
                    return _error(404, f"no file {parts[1]!r}")
                if parts[2:] == ["content"]:
                    return 200, self.content[parts[1]]
                return _ok(self.files[parts[1]])
            if parts == ["batches"] and method == "POST":
                return self._create(json.loads(raw or b"{}"))
            if parts == ["batches"] and method == "GET":
                limit = int(m.group(1)) if (m := re.search(r"limit=(\d+)", query)) else 20
                data = sorted(self.jobs.values(), key=lambda j: j["created_at"], reverse=True)[:limit]
                return _ok({"object": "list", "data": data, "has_more": False})
            if len(parts) >= 2 and parts[0] == "batches" and parts[1] in self.jobs:
                job_id = parts[1]
                if parts[2:] == ["cancel"] and method == "POST":
                    if self.jobs[job_id]["status"] not in ("completed", "expired", "failed", "cancelled"):
                        self.private[job_id]["cancel"] = True
                        self.jobs[job_id]["status"] = "cancelling"
                    return _ok(self.jobs[job_id])
                if len(parts) == 2 and method == "GET":
                    return _ok(self._advance(job_id, answer))
            return _error(404, f"no route {method} {path}")
        except (ValueError, KeyError, TypeError) as e:
            return _error(400, f"bad request: {type(e).__name__}: {e}")

    # ---- files ----------------------------------------------------------------------------------

    def _store(self, content: bytes, filename: str, purpose: str) -> dict[str, Any]:
        file_id = f"file-{len(self.files) + 1}"
        meta = {"id": file_id, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": filename, "purpose": purpose}  # fmt: skip
        self.files[file_id], self.content[file_id] = meta, content
        return meta

    def _upload(self, raw: bytes, content_type: str) -> tuple[int, bytes]:
        form = parse_multipart(raw, content_type)
        if "file" not in form or "purpose" not in form:
            return _error(400, "a file upload needs the fields 'purpose' and 'file'")
        purpose = form["purpose"][1].decode()
        filename, content = form["file"]
        if purpose == "batch":
            lines = [ln for ln in content.splitlines() if ln.strip()]
            if len(lines) > self.config.batch_max_requests:
                return _error(400, f"the batch input file has {len(lines)} requests; at most "
                                   f"{self.config.batch_max_requests} are allowed")  # fmt: skip
            if len(content) > self.config.batch_max_bytes:
                return _error(400, f"the batch input file is {len(content)} bytes; at most "
                                   f"{self.config.batch_max_bytes} are allowed")  # fmt: skip
        return _ok(self._store(content, filename or "upload", purpose))

    # ---- jobs -----------------------------------------------------------------------------------

    def _create(self, req: dict[str, Any]) -> tuple[int, bytes]:
        file_id, endpoint = req.get("input_file_id"), req.get("endpoint")
        if file_id not in self.files:
            return _error(400, f"no input file {file_id!r}")
        if req.get("completion_window") != "24h":
            return _error(400, f"completion_window must be '24h', got {req.get('completion_window')!r}")
        if endpoint not in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            return _error(400, f"endpoint {endpoint!r} is not supported")
        problems, seen, lines = [], set(), 0
        for i, raw in enumerate(self.content[file_id].splitlines(), 1):
            if not raw.strip():
                continue
            lines += 1
            try:
                line = json.loads(raw)
            except ValueError:
                problems.append({"code": "invalid_json_line", "line": i, "message": f"line {i} is not JSON"})
                continue
            cid = line.get("custom_id")
            why = ("custom_id is missing" if not cid else f"custom_id {cid!r} is used twice" if cid in seen
                   else f"method must be POST, got {line.get('method')!r}" if line.get("method") != "POST"
                   else f"url {line.get('url')!r} differs from the job's endpoint" if line.get("url") != endpoint
                   else "the body has no model" if not (line.get("body") or {}).get("model") else None)  # fmt: skip
            seen.add(cid)
            if why:
                problems.append({"code": "invalid_request", "line": i, "message": f"line {i}: {why}"})
        job_id = f"batch_{len(self.jobs) + 1}"
        now = int(time.time())
        self.jobs[job_id] = {
            "id": job_id, "object": "batch", "endpoint": endpoint, "errors": None, "input_file_id": file_id,
            "completion_window": "24h", "status": "validating", "output_file_id": None, "error_file_id": None,
            "created_at": now, "expires_at": now + 86400, "request_counts": {"total": lines, "completed": 0, "failed": 0},
            "metadata": req.get("metadata") or {},
        }  # fmt: skip
        self.private[job_id] = {"polls": 0, "cancel": False, "problems": problems}
        return _ok(self.jobs[job_id])

    def _advance(self, job_id: str, answer: Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        job, mine = self.jobs[job_id], self.private[job_id]
        if job["status"] in ("completed", "expired", "failed", "cancelled"):
            return job
        mine["polls"] += 1
        if mine["problems"]:
            job.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": mine["problems"]})
        elif mine["cancel"]:
            self._finish(job, "cancelled", answer)
        elif mine["polls"] >= self.config.batch_polls and self.config.batch_outcome == "failed":
            refused = [{"code": "injected", "line": None, "message": "the job failed (batch_outcome='failed')"}]
            job.update(status="failed", failed_at=int(time.time()), errors={"object": "list", "data": refused})
        elif mine["polls"] >= self.config.batch_polls:
            self._finish(job, self.config.batch_outcome, answer)
        else:
            job["status"] = "in_progress"
        return job

    def _finish(self, job: dict[str, Any], status: str, answer: Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]) -> None:
        lines = [json.loads(raw) for raw in self.content[job["input_file_id"]].splitlines() if raw.strip()]
        answered = len(lines) if status == "completed" else len(lines) // 2
        out: list[dict[str, Any]] = []
        err: list[dict[str, Any]] = []
        for i, line in enumerate(lines):
            rid = f"batch_req_{job['id']}_{i}"
            if i >= answered:
                code = "batch_expired" if status == "expired" else "batch_cancelled"
                err.append({"id": rid, "custom_id": line["custom_id"], "response": None,
                            "error": {"code": code, "message": f"this request was not run before the job was {status}"}})  # fmt: skip
                continue
            code_http, body = answer(line["url"], line["body"])
            self.lines_answered += 1
            entry = {"id": rid, "custom_id": line["custom_id"], "error": None,
                     "response": {"status_code": code_http, "request_id": rid, "body": body}}  # fmt: skip
            (out if code_http == 200 else err).append(entry)
        encode = lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()  # noqa: E731
        job["output_file_id"] = self._store(encode(out), f"{job['id']}_output.jsonl", "batch_output")["id"] if out else None
        job["error_file_id"] = self._store(encode(err), f"{job['id']}_error.jsonl", "batch_output")["id"] if err else None
        job["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        job["status"] = status
        job[f"{status}_at"] = int(time.time())


def _ok(obj: Any) -> tuple[int, bytes]:
    return 200, json.dumps(obj).encode()


def _error(status: int, message: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()


def answer_file(src: str | Path, dst: str | Path, base_url: str) -> int:
    """Do what `vllm run-batch -i src -o dst` does, against an OpenAI-compatible server at `base_url` (…/v1): send each
    line's body to its url and write vLLM's output lines. Tests hand a `batch: vllm-file` job to the scripted
    server this way, as a user hands it to a GPU box. Returns the lines answered."""
    import urllib.error
    import urllib.request

    root = base_url.rstrip("/").removesuffix("/v1")
    out: list[dict[str, Any]] = []
    for raw in Path(src).read_bytes().splitlines():
        if not raw.strip():
            continue
        line = json.loads(raw)
        req = urllib.request.Request(root + line["url"], data=json.dumps(line["body"]).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                status, body = r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            status, body = e.code, json.loads(e.read() or b"{}")
        rid = f"vllm-batch-{len(out)}"
        out.append({"id": rid, "custom_id": line["custom_id"], "error": None,
                    "response": {"status_code": status, "request_id": rid, "body": body}})  # fmt: skip
    tmp = Path(dst).with_name(Path(dst).name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    tmp.replace(dst)
    return len(out)
