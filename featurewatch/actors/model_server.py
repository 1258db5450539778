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
from pathlib import Path
from typing import Literal

import ray
import torch
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from featurewatch.actors.metrics import CaptureMetrics, Exporter
from featurewatch.actors.replica_controls import (
    CanaryRoute,
    always_sampled,
    read_user_config,
    replica_id,
)
from featurewatch.actors.runtime import collector_lookup
from featurewatch.capture.generation import BatchGenerator, GenerationResult
from featurewatch.capture.hooks import ActivationCapture
from featurewatch.capture.models import load_model, resolve_model_path
from featurewatch.capture.packing import pack_batches
from featurewatch.capture.sampler import SamplingPolicy
from featurewatch.capture.sender import ActivationSender
from featurewatch.capture.steering import Steering
from featurewatch.config import build_config
from featurewatch.storage.heartbeats import Heartbeat

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
    metadata: dict[str, str] | None = None


class _Pending(BaseModel):
    request: ChatRequest
    always_sample: bool = False


@serve.deployment(name="ModelServer", max_ongoing_requests=64)
@serve.ingress(app)
class ModelServer:
    def __init__(
        self,
        config: dict,
        collector_addresses: list[str],
        token: str,
        collector_names: list[str] | None = None,
    ):
        self.cfg = build_config(config)
        torch.set_num_threads(self.cfg.model.torch_threads)
        folder = resolve_model_path(self.cfg.model.path, self.cfg.models_dir)
        model, tokenizer = load_model(folder, self.cfg.model.dtype)
        cap = self.cfg.capture
        self.policy = SamplingPolicy(
            cap.sample_fraction,
            request_fraction=cap.request_fraction,
            max_vectors_per_s=cap.max_vectors_per_s,
            seed=cap.seed,
        )
        self.capture = ActivationCapture(
            model, cap.layers, cap.sites, self.policy, getattr(torch, cap.wire_dtype)
        ).__enter__()
        # Registered after capture, but its hooks go first: capture samples the steered
        # stream. `reconfigure` (Serve's user_config) sets the steers, no restart.
        self.steering = Steering(model)
        # A canary (another model version, its own Serve application) takes a share of
        # the chat requests when the user_config names one.
        self.canary = CanaryRoute(self.cfg.capture.seed)
        self.generator = BatchGenerator(model, tokenizer, self.capture)
        self.replica_id = replica_id()
        tls = self.cfg.collector.tls_cert_file
        self.sender = ActivationSender(
            collector_addresses,
            token,
            self.replica_id,
            max_queue_batches=cap.queue_batches,
            root_certificates=Path(tls).read_bytes() if tls else None,
            resolve=collector_lookup(collector_names) if collector_names else None,
        )
        self._chat_batch.set_max_batch_size(self.cfg.model.max_batch_size)
        self._chat_batch.set_batch_wait_timeout_s(self.cfg.model.batch_wait_timeout_s)
        self.batch_sizes: list[int] = []
        self.metrics = CaptureMetrics(self.cfg.model.name, self.replica_id)
        # The same figures as a file in the home, for `featurewatch status` and the
        # dashboard, which read them without joining the Ray cluster.
        self.heartbeat = Heartbeat(self.cfg.status_dir, "replica", self.replica_id)
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        Exporter(2.0, self._export_capture_stats, "capture")

    def _export_capture_stats(self) -> None:
        stats = self.capture_stats()
        self.metrics.export(stats)
        capture = self.cfg.capture
        self.heartbeat.beat(
            {
                "model": self.cfg.model.name,
                "model_version": self.cfg.model.version,
                "sample_fraction": capture.sample_fraction,
                "request_fraction": capture.request_fraction,
                "queue_depth": stats["queue_depth"],
                "in_flight": stats["in_flight"],
                "collector": self.sender.address,
                "node_id": self.node_id,
            },
            {name: stats[name] for name in CaptureMetrics.COUNTERS},
        )

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
    async def chat_completions(self, request: ChatRequest, http: Request) -> dict:
        if request.stream:
            raise HTTPException(400, "stream: streaming responses are not supported")
        if request.model not in (None, self.cfg.model.name):
            raise HTTPException(404, f"model: unknown model {request.model!r}")
        limit = self.cfg.model.max_tokens_limit
        if request.max_tokens is not None and request.max_tokens > limit:
            raise HTTPException(400, f"max_tokens: {request.max_tokens} exceeds the limit {limit}")
        always = always_sampled(
            self.cfg.capture.always_sample_header, http.headers, request.metadata
        )
        handle = self.canary.pick()
        if handle is not None:
            answer = await self.canary.forward(handle, request.model_dump(), always)
            if answer is not None:
                return answer
        return await self._chat_batch(_Pending(request=request, always_sample=always))

    async def canary_chat(self, body: dict, always: bool) -> dict:
        """A chat routed here by the served version's replicas (this one is a canary)."""
        request = ChatRequest.model_validate(body)
        return await self._chat_batch(_Pending(request=request, always_sample=always))

    # ---- batching

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _chat_batch(self, requests: list[_Pending]) -> list[dict]:
        # generate is blocking; run it off the event loop so requests keep queueing.
        return await asyncio.to_thread(self._run_batch, requests)

    def _run_batch(self, pending: list[_Pending]) -> list[dict]:
        self.batch_sizes.append(len(pending))
        requests = [p.request for p in pending]
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
                always_sample=[pending[i].always_sample for i in indices],
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
            # Which model version answered (the served one, or a canary).
            "system_fingerprint": self.cfg.model.version,
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
        for batch in pack_batches(
            result,
            request_ids,
            self.generator.tokenizer,
            model=self.cfg.model.name,
            model_version=self.cfg.model.version,
            rows_per_batch=self.cfg.capture.batch_rows,
        ):
            self.sender.submit(batch)

    # ---- operator calls (through a deployment handle or user_config, not HTTP)

    def reconfigure(self, user_config: dict) -> None:
        """Serve calls this with the deployment's user_config, at start and on every
        lightweight update: `{"steering": [Steer fields, ...], "canary": {"app": name,
        "share": fraction} or null}` (empty steering: off; null canary: none)."""
        try:
            steers, canary = read_user_config(user_config)
        except (TypeError, ValueError, KeyError) as err:
            # Raising here would make Serve stop this replica: keep serving, old settings.
            log.error("user_config refused, the previous steering and canary stay: %s", err)
            return
        self.steering.set(steers)
        self.canary.set(canary)
        log.warning("steering %s, canary %s", [s.summary() for s in steers] or "off", canary)

    def steering_status(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "model_version": self.cfg.model.version,
            "steers": [s.summary() for s in self.steering.steers],
            "canary": self.canary.settings,
            "canary_forwarded": self.canary.forwarded,
        }

    def capture_stats(self) -> dict:
        stats = vars(self.sender.snapshot())
        stats["budget_dropped_vectors"] = self.policy.budget_dropped
        stats["replica_id"] = self.replica_id
        stats["batch_sizes"] = list(self.batch_sizes)
        return stats

    def flush_capture(self, timeout_s: float = 60.0) -> bool:
        return self.sender.flush(timeout_s)

    def __del__(self):
        # Serve calls this when it stops the replica: what is still queued gets a few
        # seconds to reach a collector before the process goes.
        sender = getattr(self, "sender", None)
        if sender is not None:
            sender.close(flush_timeout=10.0)


def check_settings(cfg, folder: Path) -> None:
    """The transformers engine has no options beyond those the config already checks."""


def build_app(args: dict):
    """The application `featurewatch.actors.serving` deploys by import path, so that a
    new user_config (steering) is a lightweight update of the running replicas."""
    return ModelServer.options(
        num_replicas=args["num_replicas"],
        ray_actor_options={"num_cpus": args["replica_cpus"], "resources": args["resources"]},
    ).bind(args["config"], args["collector_addresses"], args["token"], args.get("collector_names"))
