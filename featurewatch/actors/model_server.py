"""The Ray Serve model server: an OpenAI-style chat API with activation capture.

Concurrent requests are merged by `serve.batch` into one `generate` call. Capture hooks
copy sampled positions; after each batch the vectors are packed into ActivationBatch
messages and handed to the sender's bounded buffer, so serving never waits on
monitoring.
"""

import asyncio
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

import ray
import torch
from fastapi import FastAPI, HTTPException, Request, Response
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
from featurewatch.analysis.verdicts import (
    ACTIONS,
    REFUSAL,
    InlineScorer,
    count_verdicts,
    header_value,
    new_counts,
    verdict_records,
    verdict_summary,
)
from featurewatch.capture.generation import BatchGenerator, GenerationResult
from featurewatch.capture.hooks import ActivationCapture, ResponseRecorder, num_layers
from featurewatch.capture.models import load_model, resolve_model_path
from featurewatch.capture.packing import pack_batches
from featurewatch.capture.sampler import SamplingPolicy
from featurewatch.capture.sender import ActivationSender
from featurewatch.capture.steering import Steering
from featurewatch.config import build_config
from featurewatch.errors import ConfigError
from featurewatch.proto import activations_pb2 as pb
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
        # In-line verdicts (user_config too): (scorer, recorder) or None. A batch reads
        # it once; a change waiting for a running batch is applied when it ends.
        self.inline: tuple[InlineScorer, ResponseRecorder] | None = None
        self._batch_lock = threading.Lock()
        self._pending_inline: list = []
        self.verdict_settings = None  # as last taken from user_config
        self.refused: str | None = None  # why the last user_config was refused
        self.verdict_counts = new_counts()
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
    async def chat_completions(
        self, request: ChatRequest, http: Request, response: Response
    ) -> dict:
        answer = await self._chat(request, http)
        verdict = answer.get("featurewatch")
        if verdict is not None:
            response.headers["x-featurewatch-verdict"] = header_value(verdict)
        return answer

    async def _chat(self, request: ChatRequest, http: Request) -> dict:
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
        with self._batch_lock:
            try:
                return self._answer_batch(pending)
            finally:
                if self._pending_inline:  # settings that came while this batch ran
                    self._set_inline(self._pending_inline.pop())
                    self._pending_inline.clear()

    def _answer_batch(self, pending: list[_Pending]) -> list[dict]:
        self.batch_sizes.append(len(pending))
        inline = self.inline
        requests = [p.request for p in pending]
        responses: list[dict | None] = [None] * len(requests)
        # One generate per temperature: a batch shares its decoding settings.
        by_temperature: dict[float, list[int]] = {}
        for i, req in enumerate(requests):
            by_temperature.setdefault(req.temperature, []).append(i)
        for temperature, indices in by_temperature.items():
            group = [requests[i] for i in indices]
            ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in group]
            chats = [[m.model_dump() for m in r.messages] for r in group]
            limits = [r.max_tokens or self.cfg.demo.max_tokens for r in group]
            result = self.generator.generate(
                chats, limits, temperature=temperature,
                always_sample=[pending[i].always_sample for i in indices],
                recorder=inline[1] if inline else None,
            )  # fmt: skip
            self._ship(result, ids)
            answers = [self._response(ids[j], result, j) for j in range(len(group))]
            if inline is not None:
                self._judge(inline, answers, result, chats, limits, temperature)
            for j, i in enumerate(indices):
                responses[i] = answers[j]
        return responses  # type: ignore[return-value]

    # ---- in-line verdicts

    def _judge(self, inline, answers, result, chats, limits, temperature) -> None:
        """Score every answer, apply its gate, record the verdicts (to the lake through
        the collector, like the vectors) and put each in its answer's body."""
        scorer, recorder = inline
        records = []
        verdicts = [scorer.verdict(scorer.score(r)) for r in result.responses]
        again = [j for j, v in enumerate(verdicts) if v["gate"] == "regenerate"]
        for j, verdict in enumerate(verdicts):
            verdict["action"] = ACTIONS[verdict["gate"]] if verdict["gate"] else "none"
            records += verdict_records(answers[j]["id"], verdict, 0, time.time_ns())
            if verdict["gate"] == "block":
                choice = answers[j]["choices"][0]
                choice["message"]["content"], choice["finish_reason"] = REFUSAL, "content_filter"
            answers[j]["featurewatch"] = verdict
        # Regenerated once, with the flagged tags' steering: rows by the same steers.
        by_steers: dict[tuple, list[int]] = {}
        for j in again:
            by_steers.setdefault(tuple(verdicts[j]["flagged_tags"]), []).append(j)
        for tags, rows in by_steers.items():
            with self.steering.adding(scorer.regenerate_steers(list(tags))):
                redo = self.generator.generate(
                    [chats[j] for j in rows], [limits[j] for j in rows],
                    temperature=temperature, recorder=recorder,
                )  # fmt: skip
            redo_ids = [f"{answers[j]['id']}-regenerated" for j in rows]
            self._ship(redo, redo_ids)
            for k, j in enumerate(rows):
                second = scorer.verdict(scorer.score(redo.responses[k]))
                second["action"] = "flagged" if second["flagged"] else "none"
                records += verdict_records(answers[j]["id"], second, 1, time.time_ns())
                fresh = self._response(answers[j]["id"], redo, k)
                answers[j]["choices"], answers[j]["usage"] = fresh["choices"], fresh["usage"]
                answers[j]["featurewatch"] = {**second, "action": "regenerated",
                                              "first": verdicts[j]}  # fmt: skip
        count_verdicts(self.verdict_counts, verdicts)
        if records:
            self.sender.submit(pb.ActivationBatch(
                model=self.cfg.model.name, model_version=self.cfg.model.version,
                engine="hf", verdicts=[pb.Verdict(**r) for r in records],
            ))  # fmt: skip

    def _set_inline(self, scorer: InlineScorer | None) -> None:
        """Score with `scorer` from the next batch on (None: off)."""
        if scorer is None:
            old, self.inline = self.inline, None
        else:
            recorder = ResponseRecorder(self.generator.model, scorer.layers, scorer.site)
            old, self.inline = self.inline, (scorer, recorder)
        if old is not None:
            old[1].remove()

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
            steers, canary, verdicts = read_user_config(user_config)
            scorer = None
            if verdicts is not None and verdicts != self.verdict_settings:
                # checked against this model before anything changes
                model = self.generator.model
                width = int(model.config.hidden_size)
                scorer = InlineScorer(verdicts, width, num_layers(model))
        except (TypeError, ValueError, KeyError, ConfigError) as err:
            # Raising here would make Serve stop this replica: keep serving, old settings.
            log.error("user_config refused, the previous settings stay: %s", err)
            self.refused = str(err)
            return
        self.steering.set(steers)
        self.canary.set(canary)
        self.refused = None
        if verdicts != self.verdict_settings:
            self.verdict_settings = verdicts
            if self._batch_lock.acquire(blocking=False):
                try:
                    self._set_inline(scorer)
                finally:
                    self._batch_lock.release()
            else:
                self._pending_inline.append(scorer)
        log.warning("steering %s, canary %s, verdicts %s", [s.summary() for s in steers] or "off",
                    canary, [t.tag for t in verdicts.tags] if verdicts else "off")  # fmt: skip

    def steering_status(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "model_version": self.cfg.model.version,
            "steers": [s.summary() for s in self.steering.steers],
            "canary": self.canary.settings,
            "canary_forwarded": self.canary.forwarded,
            "verdicts": verdict_summary(self.verdict_settings),
            "verdict_counts": dict(self.verdict_counts),
            "refused": self.refused,
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
