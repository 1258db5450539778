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
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from transformers import AutoTokenizer
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
from featurewatch.actors.replica_controls import (
    CanaryRoute,
    always_sampled,
    read_user_config,
    replica_id,
)
from featurewatch.actors.runtime import collector_lookup
from featurewatch.actors.vllm_verdicts import (
    Answering,
    StreamedChoice,
    answer_id,
    answer_rows,
    check_xargs,
    cut,
    event,
    events,
    fix_usage,
    hide_ids,
    prepare,
    refuse,
    scored_tokens,
)
from featurewatch.analysis.verdicts import (
    ACTIONS,
    InlineScorer,
    count_verdicts,
    header_value,
    merge_verdicts,
    new_counts,
    verdict_records,
    verdict_summary,
)
from featurewatch.capture.models import resolve_model_path
from featurewatch.capture.steering import Steer
from featurewatch.capture.vllm_worker import ALWAYS_KEY
from featurewatch.config import FeaturewatchConfig, build_config
from featurewatch.errors import ConfigError
from featurewatch.storage.heartbeats import Heartbeat

log = logging.getLogger(__name__)
app = FastAPI(title="featurewatch model server (vLLM)")
VERDICT_HEADER = "x-featurewatch-verdict"
WORKER_EXTENSION = "featurewatch.capture.vllm_worker.CaptureWorkerExtension"


def engine_args(cfg: FeaturewatchConfig, folder: Path, eager: bool = True) -> AsyncEngineArgs:
    """vLLM's engine settings for a model config (checked by vLLM when the engine starts).
    Not eager (CUDA graphs, compilation) only to measure what eager mode costs: hooks do
    not fire inside a captured graph."""
    options = cfg.model.vllm
    return AsyncEngineArgs(
        model=str(folder),
        served_model_name=[cfg.model.name],
        dtype=cfg.model.dtype,
        # Eager mode: forward hooks fire on every pass (a compiled graph would skip them).
        enforce_eager=eager,
        max_model_len=options.max_model_len,
        max_num_seqs=options.max_num_seqs,
        max_num_batched_tokens=options.max_num_batched_tokens,
        kv_cache_memory_bytes=int(options.kv_cache_gib * 2**30),
        enable_prefix_caching=options.enable_prefix_caching,
        worker_extension_cls=WORKER_EXTENSION,
        seed=cfg.capture.seed,
        disable_log_stats=True,
    )


async def start_engine(
    cfg: FeaturewatchConfig,
    folder: Path,
    replica_id: str,
    addresses: list[str],
    token: str,
    eager: bool = True,
) -> tuple[AsyncLLM, dict]:
    """vLLM's async engine for `cfg` with capture attached in its worker, streaming to the
    collectors at `addresses`; returns the engine and the model's shape (layers, width)."""
    # The V1 model runner is the one whose batch layout the capture hooks read.
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    engine = AsyncLLM.from_engine_args(
        engine_args(cfg, folder, eager), usage_context=UsageContext.OPENAI_API_SERVER
    )
    try:
        settings = capture_settings(cfg, folder, replica_id, addresses, token)
        (shape,) = await engine.collective_rpc("fw_start", args=(settings,))
    except BaseException:
        engine.shutdown()
        raise
    return engine, shape


async def flush_engine_capture(engine: AsyncLLM, timeout_s: float) -> bool:
    """Wait until the collectors acked every row the engine captured so far; False on
    timeout. Polled from here: the engine's worker must not block between passes."""
    await engine.collective_rpc("fw_pack")
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        (stats,) = await engine.collective_rpc("fw_stats")
        if stats["queue_depth"] == 0 and stats["in_flight"] == 0:
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)


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
        folder = resolve_model_path(self.cfg.model.path, self.cfg.models_dir)
        self.replica_id = replica_id()
        self.engine, self.model_shape = await start_engine(
            self.cfg, folder, self.replica_id, collector_addresses, token
        )
        name = self.cfg.model.name
        self.serving_models = OpenAIServingModels(
            engine_client=self.engine,
            base_model_paths=[BaseModelPath(name=name, model_path=str(folder))],
        )
        await self.serving_models.init_static_loras()
        renderer = OnlineRenderer(
            model_config=self.engine.model_config,
            renderer=self.engine.renderer,
            request_logger=None,
            chat_template=None,
            chat_template_content_format="auto",
        )
        renderer.warmup()
        self.serving_chat = OpenAIServingChat(
            self.engine, self.serving_models, "assistant", online_renderer=renderer,
            request_logger=None, chat_template=None, chat_template_content_format="auto",
        )  # fmt: skip
        self.serving_completions = OpenAIServingCompletion(
            self.engine, self.serving_models, online_renderer=renderer, request_logger=None
        )
        # Collectors Ray restarted elsewhere are looked up here (the worker process is
        # not a Ray worker) and handed to the worker's sender.
        self.collectors = list(collector_addresses)
        self.lookup = collector_lookup(collector_names) if collector_names else None
        self.steers: list[Steer] = []
        # In-line verdicts (user_config): a request reads the scorer once, at its start.
        self.inline: InlineScorer | None = None
        self.verdict_settings = None  # as last taken from user_config
        self.refused: str | None = None  # why the last user_config was refused
        self.verdict_counts = new_counts()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        # A canary (another model version, its own Serve application) answers a share of
        # the non-streamed chat requests when the user_config names one.
        self.canary = CanaryRoute(self.cfg.capture.seed)
        self.metrics = CaptureMetrics(name, self.replica_id)
        self.heartbeat = Heartbeat(self.cfg.status_dir, "replica", self.replica_id)
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.stats: dict = {}
        # The counters live in the worker process: fetch them on the event loop.
        self.exporter = asyncio.get_running_loop().create_task(self._export_loop(2.0))

    # ---- HTTP API: vLLM's handlers

    @app.get("/v1/models")
    async def models(self) -> dict:
        listing = (await self.serving_models.show_available_models()).model_dump()
        for entry in listing["data"]:
            entry["version"] = self.cfg.model.version
        return listing

    @app.post("/v1/chat/completions")
    async def chat_completions(self, raw: Request) -> Response:
        handle = self.canary.pick()
        if handle is not None:
            try:
                body = await raw.json()
            except ValueError:
                body = None  # _dispatch answers with the error
            if isinstance(body, dict) and not body.get("stream"):
                answer = await self.canary.forward(handle, body, self._always_sample(raw, body))
                if answer is not None:
                    verdict = answer.get("featurewatch")
                    headers = {VERDICT_HEADER: header_value(verdict)} if verdict else None
                    return JSONResponse(answer, headers=headers)
        return await self._dispatch(
            raw,
            ChatCompletionRequest,
            ChatCompletionResponse,
            self.serving_chat.create_chat_completion,
        )

    async def canary_chat(self, body: dict, always: bool) -> dict:
        """A chat routed here by the served version's replicas (this one is a canary);
        an error is raised, so the served version answers it instead."""
        scorer = self.inline
        request, answering = self._validate(ChatCompletionRequest, body, always, scorer)
        handler = self.serving_chat.create_chat_completion
        answer = await handler(request, None)
        if not isinstance(answer, ChatCompletionResponse):
            if answering is not None:
                await self._forget(answering)
            raise ValueError(f"the canary refused the request: {answer}")
        if answering is None:
            return self._body(answer)
        return await self._judge(scorer, answering, self._body(answer), handler)

    @app.post("/v1/completions")
    async def completions(self, raw: Request) -> Response:
        return await self._dispatch(
            raw, CompletionRequest, CompletionResponse, self.serving_completions.create_completion
        )

    async def _dispatch(self, raw: Request, request_type, response_type, handler) -> Response:
        scorer, answering = self.inline, None
        try:
            body = await raw.json()
            if not isinstance(body, dict):
                raise ValueError("the request body must be a JSON object")
            always = self._always_sample(raw, body)
            request, answering = self._validate(request_type, body, always, scorer)
            answer = await handler(request, raw)
        except Exception as err:  # noqa: BLE001 - vLLM maps any error to its OpenAI shape
            answer = create_error_response(err)
        if isinstance(answer, ErrorResponse):
            if answering is not None:
                await self._forget(answering)
            return JSONResponse(answer.model_dump(), status_code=answer.error.code)
        if isinstance(answer, response_type):
            if answering is None:
                return JSONResponse(self._body(answer))
            body = await self._judge(scorer, answering, self._body(answer), handler)
            return JSONResponse(body, headers={VERDICT_HEADER: header_value(body["featurewatch"])})
        if answering is None:
            return StreamingResponse(answer, media_type="text/event-stream")
        return StreamingResponse(
            self._judged_stream(scorer, answering, answer),
            media_type="text/event-stream",
            # Headers go before the first token: the verdict comes in the final chunk.
            headers={VERDICT_HEADER: "final-chunk"},
        )

    def _validate(self, request_type, body: dict, always: bool, scorer=None):
        """The request vLLM will run, within the configured max_tokens limit, flagged for
        capture of every token when the client asked for it, and with a scorer, for
        recording its answer (then also the Answering)."""
        request = request_type.model_validate(body)
        check_xargs(request)
        limit = self.cfg.model.max_tokens_limit
        wanted = request.max_completion_tokens if request_type is ChatCompletionRequest else None
        wanted = wanted or request.max_tokens
        if wanted is not None and wanted > limit:
            raise ValueError(f"max_tokens: {wanted} exceeds the limit {limit}")
        if wanted is None:  # vLLM would generate up to the context's end
            request.max_tokens = wanted = limit
        if always:
            request.vllm_xargs = {**(request.vllm_xargs or {}), ALWAYS_KEY: 1}
        if scorer is None:
            return request, None
        original = request.model_copy(deep=True)
        answering = prepare(request, wanted)
        answering.original = original
        return request, answering

    # ---- in-line verdicts

    def _decode(self, answering: Answering):
        skip = answering.original.skip_special_tokens
        return lambda ids: self.tokenizer.decode(ids, skip_special_tokens=skip)

    async def _score(
        self, scorer: InlineScorer, key: str, counts: dict[int, int], take: bool
    ) -> dict[int, dict]:
        """Each choice's verdict on its first `counts[index]` tokens (fewer where fewer
        were computed: a stream's last token, or settings changed mid-answer)."""
        (recorded,) = await self.engine.collective_rpc("fw_answer", args=(key, take))
        width = self.model_shape["width"]
        return {
            index: scorer.verdict(
                scorer.score(answer_rows(recorded, index, n, scorer.layers, width))
            )
            for index, n in counts.items()
        }

    async def _forget(self, answering: Answering) -> None:
        await self.engine.collective_rpc("fw_forget", args=(answering.key,))

    async def _judge(self, scorer, answering: Answering, body: dict, handler) -> dict:
        """Cut the answer back to the client's limit, score each choice, apply its gate
        (regenerating once, if any choice asks for it), record the verdicts."""
        decode = self._decode(answering)
        fix_usage(body, sum(cut(c, answering, decode) for c in body["choices"]))
        counts = {c["index"]: scored_tokens(c, len(c.get("token_ids") or []))
                  for c in body["choices"]}  # fmt: skip
        verdicts = await self._score(scorer, answering.key, counts, take=True)
        now, records, again = time.time_ns(), [], set()
        for choice in body["choices"]:
            verdict = verdicts[choice["index"]]
            verdict["action"] = ACTIONS[verdict["gate"]] if verdict["gate"] else "none"
            records += verdict_records(answer_id(body, choice), verdict, 0, now)
            if verdict["gate"] == "block":
                refuse(choice)
            elif verdict["gate"] == "regenerate":
                again.update(verdict["flagged_tags"])
        count_verdicts(self.verdict_counts, list(verdicts.values()))
        if again:
            records += await self._regenerate(scorer, answering, body, verdicts, again, handler)
        for choice in body["choices"]:
            choice["featurewatch"] = verdicts[choice["index"]]
        body["featurewatch"] = merge_verdicts([verdicts[c["index"]] for c in body["choices"]])
        if len(body["choices"]) == 1:
            del body["choices"][0]["featurewatch"]
        hide_ids(body, answering)
        await self._submit_verdicts(records)
        return body

    async def _regenerate(self, scorer, answering, body, verdicts, tags, handler) -> list[dict]:
        """Answer the request once more with the flagged tags' steering on; the choices
        whose gate asked for it take the new answer, and both verdicts are recorded. A
        failed second answer leaves those choices refused."""
        request = answering.original.model_copy(deep=True)
        request.request_id = f"{body['id'].split('-', 1)[-1]}-regenerated"
        redo = prepare(request, answering.wanted, sorted(tags))
        redo.original = answering.original
        answer, records = None, []
        try:
            answer = (await handler(request, None)).model_dump()
            if "choices" not in answer:  # vLLM's error response
                raise ValueError(answer)
        except Exception:  # noqa: BLE001 - any failure: the flagged answers are refused
            log.exception("regenerating %s failed; the flagged answer is refused", body["id"])
            answer = None
        chosen = [c for c in body["choices"] if verdicts[c["index"]]["gate"] == "regenerate"]
        if answer is None:
            await self._forget(redo)
            for choice in chosen:
                refuse(choice)
            return records
        decode = self._decode(redo)
        fresh = {c["index"]: c for c in answer["choices"]}
        removed = sum(cut(c, redo, decode) for c in fresh.values())
        counts = {i: scored_tokens(c, len(c.get("token_ids") or [])) for i, c in fresh.items()}
        second = await self._score(scorer, redo.key, counts, take=True)
        now = time.time_ns()
        for choice in chosen:
            index = choice["index"]
            verdict = second[index]
            verdict["action"] = "flagged" if verdict["flagged"] else "none"
            records += verdict_records(answer_id(body, choice), verdict, 1, now)
            choice.clear()
            choice.update(fresh[index])
            verdicts[index] = {**verdict, "action": "regenerated", "first": verdicts[index]}
        fix_usage(answer, removed)
        body["usage"] = answer["usage"]
        return records

    async def _judged_stream(self, scorer, answering: Answering, stream):
        """vLLM's stream with each choice checked every `every` tokens, ended by a
        block or regenerate gate once flagged, and its final chunk carrying the verdict."""
        decode, every = self._decode(answering), scorer.settings.every
        choices: dict[int, StreamedChoice] = defaultdict(StreamedChoice)
        removed, records, final, stopped = 0, [], [], False
        try:
            async for piece in stream:
                out = []
                for data in events(piece):
                    chunk = None if data == "[DONE]" else json.loads(data)
                    if not isinstance(chunk, dict) or "choices" not in chunk:
                        out.append(event(data))  # the end, or an error
                        continue
                    kept = []
                    for choice in chunk["choices"]:
                        state = choices[choice["index"]]
                        if state.ended:
                            continue
                        removed += state.take(choice, answering, decode)
                        kept.append(choice)
                        ending = bool(choice.get("finish_reason"))
                        if not ending and len(state.ids) - state.checked < every:
                            continue
                        state.checked = len(state.ids)
                        n = scored_tokens(choice, len(state.ids)) if ending else len(state.ids)
                        (verdict,) = (await self._score(
                            scorer, answering.key, {choice["index"]: n}, take=False
                        )).values()  # fmt: skip
                        gated = verdict["gate"] in ("block", "regenerate")
                        if not ending and not gated:
                            continue
                        verdict["action"] = "stopped" if gated and not ending else (
                            "flagged" if verdict["flagged"] else "none")  # fmt: skip
                        if verdict["action"] == "stopped":
                            refuse(choice, text="")  # this chunk's text is never sent
                            stopped = True
                        state.ended = True
                        chunk["featurewatch"] = verdict
                        final.append(verdict)
                        records += verdict_records(answer_id(chunk, choice), verdict, 0,
                                                   time.time_ns())  # fmt: skip
                    chunk["choices"] = kept
                    fix_usage(chunk, removed)
                    hide_ids(chunk, answering)
                    if kept or chunk.get("usage"):
                        out.append(event(chunk))
                if out:
                    yield "".join(out)
                if stopped and choices and all(s.ended for s in choices.values()):
                    yield event("[DONE]")
                    break  # closing vLLM's stream aborts the request
        finally:
            await stream.aclose()
            await self._forget(answering)
            count_verdicts(self.verdict_counts, final)
            await self._submit_verdicts(records)

    async def _submit_verdicts(self, records: list[dict]) -> None:
        if records:
            await self.engine.collective_rpc(
                "fw_submit_verdicts", args=(self.cfg.model.version, records)
            )

    def _body(self, answer) -> dict:
        body = answer.model_dump()
        # Which model version answered (the served one, or a canary), as on the hf engine.
        body["system_fingerprint"] = self.cfg.model.version
        return body

    def _always_sample(self, raw: Request, body: dict) -> bool:
        return always_sampled(
            self.cfg.capture.always_sample_header, raw.headers, body.get("metadata")
        )

    # ---- operator calls (through a deployment handle or user_config, not HTTP)

    async def reconfigure(self, user_config: dict) -> None:
        """As the transformers replica's: `{"steering": [...], "canary": ...}`; steering is
        applied in vLLM's worker, between forward passes."""
        try:
            steers, canary, verdicts = read_user_config(user_config)
            scorer = None
            if verdicts is not None and verdicts != self.verdict_settings:
                shape = self.model_shape  # checked against this model first
                scorer = InlineScorer(verdicts, shape["width"], shape["layers"])
        except (TypeError, ValueError, KeyError, ConfigError) as err:
            log.error("user_config refused, the previous settings stay: %s", err)
            self.refused = str(err)
            return
        if verdicts != self.verdict_settings:
            spec = scorer and {
                "layers": scorer.layers, "site": scorer.site,
                "steering": {t: [asdict(s) for s in ss] for t, ss in scorer.steering.items()},
            }  # fmt: skip
            await self.engine.collective_rpc("fw_set_verdicts", args=(spec,))
            self.inline, self.verdict_settings = scorer, verdicts
        if steers != self.steers:
            try:
                await self.engine.collective_rpc(
                    "fw_set_steering", args=([asdict(s) for s in steers],)
                )
            except Exception as err:  # noqa: BLE001 - the worker's refusal, relayed
                log.error("the engine refused the steering, the previous one stays: %s", err)
                return
            # KV blocks cached under the old steering would carry it into new requests.
            if not await self.engine.reset_prefix_cache():
                log.warning("prefix cache not reset: blocks cached before the change stay")
        self.steers = steers
        self.canary.set(canary)
        self.refused = None
        log.warning("steering %s, canary %s, verdicts %s", [s.summary() for s in steers] or "off",
                    canary, [t.tag for t in verdicts.tags] if verdicts else "off")  # fmt: skip

    def steering_status(self) -> dict:
        return {
            "replica_id": self.replica_id,
            "model_version": self.cfg.model.version,
            "steers": [s.summary() for s in self.steers],
            "canary": self.canary.settings,
            "canary_forwarded": self.canary.forwarded,
            "verdicts": verdict_summary(self.verdict_settings),
            "verdict_counts": dict(self.verdict_counts),
            "refused": self.refused,
        }

    async def capture_stats(self) -> dict:
        (stats,) = await self.engine.collective_rpc("fw_stats")
        self.collector_address = stats.pop("address")
        stats["replica_id"] = self.replica_id
        self.stats = stats
        return stats

    async def flush_capture(self, timeout_s: float = 60.0) -> bool:
        return await flush_engine_capture(self.engine, timeout_s)

    async def check_health(self) -> None:
        """Serve's health check: a dead engine process fails it, and Serve replaces the
        replica."""
        await self.engine.check_health()

    async def _export_loop(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self._export_capture_stats()
            except Exception:  # noqa: BLE001 - metrics never stop the replica
                log.exception("exporting capture stats failed")

    async def _export_capture_stats(self) -> None:
        if self.lookup is not None:
            fresh = await asyncio.to_thread(self.lookup)
            if fresh and fresh != self.collectors:
                await self.engine.collective_rpc("fw_set_collectors", args=(fresh,))
                self.collectors = fresh
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
                "collector": self.collector_address,
                "node_id": self.node_id,
            },
            {name: stats[name] for name in CaptureMetrics.COUNTERS},
        )

    async def __del__(self):
        # Serve awaits this when it stops the replica: what is still queued gets a few
        # seconds to reach a collector, then the engine process goes.
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        self.exporter.cancel()
        try:
            await asyncio.wait_for(engine.collective_rpc("fw_stop"), timeout=15.0)
        except Exception:  # noqa: BLE001 - shutting down regardless
            log.exception("stopping capture failed")
        engine.shutdown()


def build_app(args: dict):
    """The application `featurewatch.actors.serving` deploys for `engine: vllm`."""
    return VLLMModelServer.options(
        num_replicas=args["num_replicas"],
        ray_actor_options={"num_cpus": args["replica_cpus"], "resources": args["resources"]},
    ).bind(args["config"], args["collector_addresses"], args["token"], args.get("collector_names"))
