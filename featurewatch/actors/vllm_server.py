"""The Ray Serve model server on vLLM's engine (`model.engine: vllm`).

Each replica owns one vLLM async engine (continuous batching, paged KV cache) and
answers with vLLM's own OpenAI-compatible handlers: chat and completions, streaming
(server-sent events), n, stop, top_p, max_tokens, usage, and vLLM's error shape. What
featurewatch adds sits around them: the request's id and always-sample flag go into the
engine request, and capture and steering run inside vLLM's model worker
(featurewatch/capture/vllm_worker.py), reached through the engine's collective_rpc.

The deployment keeps the transformers replica's name and operator calls (reconfigure,
steering_status, capture_stats, flush_capture), so deployment, steering, canaries and
`featurewatch status` work the same on both engines.
"""

import asyncio
import logging
import os
import uuid
from dataclasses import asdict
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
)
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.entrypoints.openai.models.protocol import BaseModelPath
from vllm.entrypoints.openai.models.serving import OpenAIServingModels
from vllm.entrypoints.serve import create_error_response
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.usage.usage_lib import UsageContext
from vllm.v1.engine.async_llm import AsyncLLM

from featurewatch.actors.metrics import CaptureMetrics
from featurewatch.capture.models import resolve_model_path
from featurewatch.capture.steering import Steer
from featurewatch.capture.vllm_worker import ALWAYS_KEY
from featurewatch.config import FeaturewatchConfig, build_config
from featurewatch.errors import ConfigError
from featurewatch.storage.heartbeats import Heartbeat

log = logging.getLogger(__name__)
app = FastAPI(title="featurewatch model server (vLLM)")
WORKER_EXTENSION = "featurewatch.capture.vllm_worker.CaptureWorkerExtension"


def engine_args(cfg: FeaturewatchConfig, folder: Path) -> AsyncEngineArgs:
    """vLLM's engine settings for a model config (checked by vLLM when the engine starts)."""
    options = cfg.model.vllm
    return AsyncEngineArgs(
        model=str(folder),
        served_model_name=[cfg.model.name],
        dtype=cfg.model.dtype,
        # Eager mode: forward hooks fire on every pass (a compiled graph would skip them).
        enforce_eager=True,
        max_model_len=options.max_model_len,
        max_num_seqs=options.max_num_seqs,
        kv_cache_memory_bytes=int(options.kv_cache_gib * 2**30),
        enable_prefix_caching=options.enable_prefix_caching,
        worker_extension_cls=WORKER_EXTENSION,
        seed=cfg.capture.seed,
        disable_log_stats=True,
    )


def check_settings(cfg: FeaturewatchConfig, folder: Path) -> None:
    """vLLM's own validation of the engine settings (the model's config, dtype, lengths,
    scheduler limits), without loading weights: a ConfigError naming the field."""
    try:
        engine_args(cfg, folder).create_engine_config()
    except (ValueError, TypeError, OSError) as err:  # pydantic's ValidationError included
        raise ConfigError(
            f"{cfg.model.name}: vLLM refuses the engine settings (model.dtype, model.vllm.*) "
            f"for {folder}: {err}"
        ) from None


def capture_settings(
    cfg: FeaturewatchConfig, folder: Path, replica_id: str, addresses: list[str], token: str
) -> dict:
    """What the worker's capture needs, as plain data (it crosses a process boundary)."""
    cap = cfg.capture
    tls = cfg.collector.tls_cert_file
    return {
        "model": cfg.model.name,
        "model_version": cfg.model.version,
        "replica_id": replica_id,
        "layers": list(cap.layers),
        "sites": list(cap.sites),
        "sample_fraction": cap.sample_fraction,
        "request_fraction": cap.request_fraction,
        "max_vectors_per_s": cap.max_vectors_per_s,
        "seed": cap.seed,
        "wire_dtype": cap.wire_dtype,
        "batch_rows": cap.batch_rows,
        "queue_batches": cap.queue_batches,
        "flush_after_s": 0.5,
        "collector_addresses": list(addresses),
        "token": token,
        "root_certificates": Path(tls).read_bytes() if tls else None,
        "tokenizer": str(folder),
    }


@serve.deployment(name="ModelServer", max_ongoing_requests=64)
@serve.ingress(app)
class VLLMModelServer:
    async def __init__(
        self,
        config: dict,
        collector_addresses: list[str],
        token: str,
        collector_names: list[str] | None = None,
    ):
        self.cfg = build_config(config)
        # The V1 model runner is the one whose batch layout the capture hooks read.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        folder = resolve_model_path(self.cfg.model.path, self.cfg.models_dir)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (tests)
            self.replica_id = uuid.uuid4().hex[:12]
        self.engine = AsyncLLM.from_engine_args(
            engine_args(self.cfg, folder), usage_context=UsageContext.OPENAI_API_SERVER
        )
        name = self.cfg.model.name
        self.models = OpenAIServingModels(
            engine_client=self.engine,
            base_model_paths=[BaseModelPath(name=name, model_path=str(folder))],
        )
        await self.models.init_static_loras()
        renderer = OnlineRenderer(
            model_config=self.engine.model_config,
            renderer=self.engine.renderer,
            request_logger=None,
            chat_template=None,
            chat_template_content_format="auto",
        )
        renderer.warmup()
        self.chat = OpenAIServingChat(
            self.engine, self.models, "assistant", online_renderer=renderer,
            request_logger=None, chat_template=None, chat_template_content_format="auto",
        )  # fmt: skip
        self.completions = OpenAIServingCompletion(
            self.engine, self.models, online_renderer=renderer, request_logger=None
        )
        settings = capture_settings(self.cfg, folder, self.replica_id, collector_addresses, token)
        (self.model_shape,) = await self.engine.collective_rpc("fw_start", args=(settings,))
        self.steers: list[Steer] = []
        self.canary: dict | None = None
        self.metrics = CaptureMetrics(name, self.replica_id)
        self.heartbeat = Heartbeat(self.cfg.status_dir, "replica", self.replica_id)
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.stats: dict = {}
        # The counters live in the worker process: fetch them on the event loop.
        self.exporter = asyncio.get_running_loop().create_task(self._export_loop(2.0))

    # ---- HTTP API: vLLM's handlers

    @app.get("/v1/models")
    async def list_models(self) -> Response:
        listing = await self.models.show_available_models()
        return JSONResponse(listing.model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(self, raw: Request) -> Response:
        return await self._dispatch(
            raw, ChatCompletionRequest, ChatCompletionResponse, self.chat.create_chat_completion
        )

    @app.post("/v1/completions")
    async def completions(self, raw: Request) -> Response:
        return await self._dispatch(
            raw, CompletionRequest, CompletionResponse, self.completions.create_completion
        )

    async def _dispatch(self, raw: Request, request_type, response_type, handler) -> Response:
        try:
            body = await raw.json()
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            request = request_type.model_validate(body)
            limit = self.cfg.model.max_tokens_limit
            wanted = (
                request.max_completion_tokens if request_type is ChatCompletionRequest else None
            )
            wanted = wanted or request.max_tokens
            if wanted is not None and wanted > limit:
                raise ValueError(f"max_tokens: {wanted} exceeds the limit {limit}")
            if self._always_sample(raw, body):
                request.vllm_xargs = {**(request.vllm_xargs or {}), ALWAYS_KEY: 1}
            answer = await handler(request, raw)
        except Exception as err:  # noqa: BLE001 - vLLM maps any error to its OpenAI shape
            answer = create_error_response(err)
        if isinstance(answer, ErrorResponse):
            return JSONResponse(answer.model_dump(), status_code=answer.error.code)
        if isinstance(answer, response_type):
            return JSONResponse(answer.model_dump())
        return StreamingResponse(answer, media_type="text/event-stream")

    def _always_sample(self, raw: Request, body: dict) -> bool:
        flag = self.cfg.capture.always_sample_header
        metadata = body.get("metadata")
        in_metadata = isinstance(metadata, dict) and str(metadata.get(flag, "")).lower() == "always"
        return raw.headers.get(flag, "").lower() == "always" or in_metadata

    # ---- operator calls (through a deployment handle or user_config, not HTTP)

    async def reconfigure(self, user_config: dict) -> None:
        """As the transformers replica's: `{"steering": [...], "canary": ...}`; steering is
        applied in vLLM's worker, between forward passes."""
        user_config = user_config or {}
        try:
            steers = [Steer.from_dict(s) for s in user_config.get("steering", [])]
            await self.engine.collective_rpc("fw_set_steering", args=([asdict(s) for s in steers],))
        except (TypeError, ValueError, KeyError) as err:
            log.error("user_config refused, the previous steering stays: %s", err)
            return
        self.steers = steers
        self.canary = user_config.get("canary")

    def steering_status(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "model_version": self.cfg.model.version,
            "steers": [s.summary() for s in self.steers],
            "canary": self.canary,
            "canary_forwarded": 0,
        }

    async def capture_stats(self) -> dict:
        (stats,) = await self.engine.collective_rpc("fw_stats")
        stats["replica_id"] = self.replica_id
        stats["batch_sizes"] = []
        self.stats = stats
        return stats

    async def flush_capture(self, timeout_s: float = 60.0) -> bool:
        (done,) = await self.engine.collective_rpc("fw_flush", args=(timeout_s,))
        return bool(done)

    async def _export_loop(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self._export_capture_stats()
            except Exception:  # noqa: BLE001 - metrics never stop the replica
                log.exception("exporting capture stats failed")

    async def _export_capture_stats(self) -> None:
        stats = await self.capture_stats()
        self.metrics.export(stats)
        capture = self.cfg.capture
        self.heartbeat.beat(
            {
                "model": self.cfg.model.name,
                "model_version": self.cfg.model.version,
                "engine": "vllm",
                "sample_fraction": capture.sample_fraction,
                "request_fraction": capture.request_fraction,
                "queue_depth": stats["queue_depth"],
                "in_flight": stats["in_flight"],
                "collector": None,
                "node_id": self.node_id,
            },
            {name: stats[name] for name in CaptureMetrics.COUNTERS},
        )


def build_app(args: dict):
    """The application `featurewatch.actors.serving` deploys for `engine: vllm`."""
    return VLLMModelServer.options(
        num_replicas=args["num_replicas"],
        ray_actor_options={"num_cpus": args["replica_cpus"], "resources": args["resources"]},
    ).bind(args["config"], args["collector_addresses"], args["token"], args.get("collector_names"))
