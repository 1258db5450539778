"""The Ray Serve model server: an OpenAI-style chat API with activation capture.

Concurrent requests are merged by `serve.batch` into one `generate` call. Capture hooks
copy sampled positions; after each batch the vectors are packed into ActivationBatch
messages and handed to the sender's bounded buffer, so serving never waits on
monitoring.
"""

import asyncio
import logging
import time
import uuid
from typing import Literal

import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from featurewatch.capture.generation import BatchGenerator, GenerationResult
from featurewatch.capture.hooks import ActivationCapture
from featurewatch.capture.models import load_model, resolve_model_path
from featurewatch.capture.sampler import TokenSampler
from featurewatch.capture.sender import ActivationSender
from featurewatch.platform.config import build_config
from featurewatch.proto.codec import make_batch

log = logging.getLogger(__name__)
app = FastAPI(title="featurewatch model server")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    # OpenAI clients send more fields (top_p, n, ...); unknown ones are ignored.
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False


@serve.deployment(name="ModelServer", max_ongoing_requests=64)
@serve.ingress(app)
class ModelServer:
    def __init__(self, config: dict, collector_address: str, token: str):
        self.cfg = build_config(config)
        torch.set_num_threads(self.cfg.model.torch_threads)
        folder = resolve_model_path(self.cfg.model.path, self.cfg.models_dir)
        model, tokenizer = load_model(folder, self.cfg.model.dtype)
        cap = self.cfg.capture
        store_dtype = getattr(torch, cap.wire_dtype)
        self.capture = ActivationCapture(
            model, [cap.layer], cap.site, TokenSampler(cap.sample_fraction, cap.seed), store_dtype
        ).__enter__()
        self.generator = BatchGenerator(model, tokenizer, self.capture)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (tests)
            self.replica_id = uuid.uuid4().hex[:12]
        self.sender = ActivationSender(
            collector_address, token, self.replica_id, max_queue_batches=cap.queue_batches
        )
        self._chat_batch.set_max_batch_size(self.cfg.model.max_batch_size)
        self._chat_batch.set_batch_wait_timeout_s(self.cfg.model.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []

    # ---- HTTP API

    @app.get("/v1/models")
    def models(self) -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.cfg.model.name,
                    "object": "model",
                    "owned_by": "featurewatch",
                    "version": self.cfg.model.version,
                }
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: ChatRequest) -> dict:
        if request.stream:
            raise HTTPException(400, "stream: streaming responses are not supported")
        if request.model not in (None, self.cfg.model.name):
            raise HTTPException(404, f"model: unknown model {request.model!r}")
        limit = self.cfg.model.max_tokens_limit
        if request.max_tokens is not None and request.max_tokens > limit:
            raise HTTPException(400, f"max_tokens: {request.max_tokens} exceeds the limit {limit}")
        return await self._chat_batch(request)

    # ---- batching

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _chat_batch(self, requests: list[ChatRequest]) -> list[dict]:
        # generate is blocking; run it off the event loop so requests keep queueing.
        return await asyncio.to_thread(self._run_batch, requests)

    def _run_batch(self, requests: list[ChatRequest]) -> list[dict]:
        self.batch_sizes.append(len(requests))
        responses: list[dict | None] = [None] * len(requests)
        # One generate per temperature: a batch shares its decoding settings.
        by_temperature: dict[float, list[int]] = {}
        for i, req in enumerate(requests):
            by_temperature.setdefault(req.temperature, []).append(i)
        for temperature, indices in by_temperature.items():
            group = [requests[i] for i in indices]
            ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in group]
            result = self.generator.generate(
                [[m.model_dump() for m in r.messages] for r in group],
                [r.max_tokens or self.cfg.demo.max_tokens for r in group],
                temperature=temperature,
            )
            self._ship(result, ids)
            for j, i in enumerate(indices):
                responses[i] = self._response(ids[j], result, j)
        return responses  # type: ignore[return-value]

    def _response(self, request_id: str, result: GenerationResult, j: int) -> dict:
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.cfg.model.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.texts[j]},
                    "finish_reason": result.finish_reasons[j],
                }
            ],
            "usage": {
                "prompt_tokens": result.prompt_tokens[j],
                "completion_tokens": result.completion_tokens[j],
                "total_tokens": result.prompt_tokens[j] + result.completion_tokens[j],
            },
        }

    def _ship(self, result: GenerationResult, request_ids: list[str]) -> None:
        """Pack captured vectors into messages and queue them; never blocks."""
        tokenizer = self.generator.tokenizer
        rows = self.cfg.capture.batch_rows
        for captured in result.captured:
            token_ids = captured.token_id.tolist()
            texts = tokenizer.batch_decode([[t] for t in token_ids])
            for start in range(0, len(token_ids), rows):
                end = start + rows
                index = captured.request_index[start:end].tolist()
                used = sorted(set(index))
                remap = {r: n for n, r in enumerate(used)}
                batch = make_batch(
                    captured.vectors[start:end],
                    model=self.cfg.model.name,
                    model_version=self.cfg.model.version,
                    layer=captured.layer,
                    site=self.cfg.capture.site,
                    request_ids=[request_ids[r] for r in used],
                    request_index=[remap[r] for r in index],
                    token_pos=captured.token_pos[start:end].tolist(),
                    token_id=token_ids[start:end],
                    ts_unix_nanos=[captured.ts_unix_nanos] * len(index),
                    token_text=texts[start:end],
                )
                self.sender.submit(batch)

    # ---- operator calls (through a deployment handle, not HTTP)

    def capture_stats(self) -> dict:
        stats = vars(self.sender.snapshot())
        stats["replica_id"] = self.replica_id
        stats["batch_sizes"] = list(self.batch_sizes)
        return stats

    def flush_capture(self, timeout_s: float = 60.0) -> bool:
        return self.sender.flush(timeout_s)
