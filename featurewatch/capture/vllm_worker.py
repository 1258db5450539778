"""Capture and steering inside vLLM's model worker.

vLLM's engine runs the model in its own process (the engine core, spawned by the async
engine), and its scheduler flattens the tokens of every scheduled request into one
[num_tokens, d_model] tensor per layer: prefills, chunked prefills and decodes of
different requests share a forward pass. `CaptureWorkerExtension` is mixed into vLLM's
worker class (`worker_extension_cls`); the Serve replica calls its `fw_*` methods by name
through the engine's `collective_rpc`, between forward passes.

Its hooks attribute each row of a forward to its request and position: the model
runner's batch lists the scheduled requests in row order and the attention metadata's
`query_start_loc` gives each request's rows; the layer's `positions` input is each row's
position in its request. Sampled rows are packed into ActivationBatch messages in the
worker and sent by an ActivationSender from there, so vectors never cross back to the
replica.

In vLLM's Llama blocks the residual add is fused into the next norm: a block returns
(mlp_out, resid_mid), so the residual stream after the block is their sum. Positions a
prefix-cache hit skips are never computed, so they are never captured.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict, deque

import torch
from transformers import AutoTokenizer
from vllm.forward_context import get_forward_context, is_forward_context_available

from featurewatch.capture.hooks import find_decoder_layers, site_module
from featurewatch.capture.sampler import SamplingPolicy
from featurewatch.capture.sender import ActivationSender
from featurewatch.capture.steering import Steer, Steering
from featurewatch.proto import activations_pb2 as pb
from featurewatch.proto.codec import make_batch

log = logging.getLogger(__name__)

# vLLM's engine appends 8 random hex digits to the request id it was given, and prefixes
# "<i>_" to each of the n sequences of one request.
_ENGINE_ID = re.compile(r"^(?:(?P<child>\d+)_)?(?P<base>.+)-[0-9a-f]{8}$")
ALWAYS_KEY = "featurewatch_always"  # in a request's vllm_xargs: capture every token
# In-line verdicts (analysis/verdicts.py), in a request's vllm_xargs: record this
# answer's residual stream under the given key; steer it with these tags' steers (a
# regenerated answer, comma-separated tags).
VERDICT_KEY = "featurewatch_verdict"
STEER_KEY = "featurewatch_steer"
RESERVED_PREFIX = "featurewatch"  # xargs a client may not set
_DECISIONS_KEPT = 65536  # per-request sampling decisions remembered (bounded)
_ANSWERS_KEPT = 1024  # answers recorded for verdicts and not yet taken (bounded)


def request_key(engine_id: str) -> str:
    """The lake's request id for an engine request id: the id the replica gave vLLM,
    with the sequence's index for n > 1 ('chatcmpl-abc' or 'chatcmpl-abc#1')."""
    found = _ENGINE_ID.match(engine_id)
    if found is None:
        return engine_id
    child = found["child"]
    return found["base"] if child in (None, "0") else f"{found['base']}#{child}"


def answer_key(engine_id: str, key: str) -> tuple[str, int]:
    """(the replica's key, the sequence's index) of an engine request recorded for a
    verdict: n > 1 sequences of one request share the key."""
    found = _ENGINE_ID.match(engine_id)
    return key, int(found["child"] or 0) if found is not None else 0


def residual_stream(site: str, output):
    """The tensor a (layer, site) hook reads: for a vLLM decoder block, mlp_out plus the
    residual it carries; for an MLP, its output."""
    if site == "resid_post" and isinstance(output, tuple) and len(output) == 2:
        hidden, residual = output
        return hidden if residual is None else hidden + residual
    return output[0] if isinstance(output, tuple) else output


class _Pending:
    """Sampled rows of one (layer, site) waiting to be packed into a message."""

    def __init__(self):
        self.vectors: list[torch.Tensor] = []
        self.request_ids: list[str] = []
        self.positions: list[int] = []
        self.token_ids: list[int] = []
        self.rows = 0
        self.since = time.monotonic()


class CaptureWorkerExtension:
    """Methods vLLM mixes into its worker; `self.model_runner` is the worker's runner."""

    def fw_start(self, settings: dict) -> dict:
        """Attach the capture hooks and the sender. `settings`: model, model_version,
        replica_id, layers, sites, sample_fraction, request_fraction, max_vectors_per_s,
        seed, wire_dtype, batch_rows, queue_batches, flush_after_s, collector_addresses,
        token, root_certificates (bytes or None), tokenizer (a folder)."""
        s = dict(settings)
        if not hasattr(self.model_runner, "input_batch"):
            raise RuntimeError(
                "capture reads vLLM's V1 model runner (input_batch); this engine runs "
                f"{type(self.model_runner).__name__}: unset VLLM_USE_V2_MODEL_RUNNER"
            )
        model = self.model_runner.model
        blocks = find_decoder_layers(model)
        for layer in s["layers"]:
            if not 0 <= layer < len(blocks):
                raise ValueError(
                    f"capture.layer {layer} is out of range: the model has {len(blocks)} layers"
                )
        self._fw = s
        self._fw_lock = threading.Lock()
        self._fw_policy = SamplingPolicy(
            s["sample_fraction"],
            request_fraction=s["request_fraction"],
            max_vectors_per_s=s["max_vectors_per_s"],
            seed=s["seed"],
        )
        self._fw_dtype = getattr(torch, s["wire_dtype"])
        self._fw_decisions: OrderedDict[str, tuple[bool, bool]] = OrderedDict()
        self._fw_pending: dict[tuple[int, str], _Pending] = {}
        # Requests in each of the last forward passes (continuous batching at work).
        self._fw_pass_sizes: deque[int] = deque(maxlen=10_000)
        self._fw_first_point = (s["layers"][0], s["sites"][0])
        self._fw_error = ""  # why capture stopped, if a hook ever failed
        self._fw_tokenizer = AutoTokenizer.from_pretrained(s["tokenizer"])
        # The replica looks collectors up in Ray and hands their addresses over
        # (fw_set_collectors); a broken stream takes the latest it handed over.
        self._fw_collectors = list(s["collector_addresses"])
        self._fw_sender = ActivationSender(
            s["collector_addresses"],
            s["token"],
            s["replica_id"],
            max_queue_batches=s["queue_batches"],
            root_certificates=s.get("root_certificates"),
            resolve=lambda: self._fw_collectors,
        )
        # Steering first: capture samples the steered stream.
        self._fw_steering = Steering(model, stream=residual_stream)
        self._fw_blocks = blocks
        self._fw_handles: list = []
        # In-line verdicts: per answer key and sequence, layer -> [(position, rows)].
        self._fw_answers: OrderedDict[tuple[str, int], dict] = OrderedDict()
        self._fw_verdict_handles: list = []
        self._fw_regenerate: dict[str, dict] = {}  # tag -> its steering terms
        self.fw_set_capture(True)
        return {"layers": len(blocks), "width": int(model.config.hidden_size)}

    def fw_set_capture(self, on: bool) -> None:
        """Attach (on) or remove (off) the capture hooks; off, a forward runs as in plain
        vLLM (the overhead benchmark compares the two in one engine)."""
        for handle in self._fw_handles:
            handle.remove()
        self._fw_handles = []
        if on:
            for layer in self._fw["layers"]:
                for site in self._fw["sites"]:
                    module = site_module(self._fw_blocks[layer], site)
                    self._fw_handles.append(
                        module.register_forward_hook(self._fw_hook(layer, site))
                    )

    def fw_set_steering(self, steers: list[dict]) -> list[dict]:
        self._fw_steering.set([Steer.from_dict(s) for s in steers])
        return [s.summary() for s in self._fw_steering.steers]

    def fw_set_verdicts(self, spec: dict | None) -> None:
        """Record every verdict request's answer at `spec["layers"]` (site
        `spec["site"]`), and steer regenerated answers with `spec["steering"]`
        ({tag: [steer, ...]}); None: off. Answers recorded so far stay until taken."""
        for handle in self._fw_verdict_handles:
            handle.remove()
        self._fw_verdict_handles = []
        self._fw_regenerate = {}
        self._fw_steering.rows_for = None
        if spec is None:
            return
        self._fw_verdict_layers = sorted(spec["layers"])
        self._fw_plan = None
        for layer in self._fw_verdict_layers:
            module = site_module(self._fw_blocks[layer], spec["site"])
            self._fw_verdict_handles.append(
                module.register_forward_hook(self._fw_verdict_hook(layer, spec["site"]))
            )
        self._fw_regenerate = {
            tag: self._fw_steering.terms([Steer.from_dict(s) for s in steers])
            for tag, steers in spec["steering"].items()
        }
        # Steering hooks ask for per-request rows only when some tag regenerates.
        self._fw_steering.rows_for = self._fw_steered_rows if self._fw_regenerate else None

    def fw_answer(self, key: str, take: bool) -> dict[int, dict[int, tuple[int, bytes]]]:
        """Sequence index -> layer -> (tokens, float32 bytes of [tokens, width]): the
        answer's residual stream from its first generated token, in order, as far as it
        was computed (take: forget it afterwards). Bytes: the engine's RPC would turn a
        tensor into lists."""
        found = {}
        for answer in [k for k in self._fw_answers if k[0] == key]:
            layers = self._fw_answers.pop(answer) if take else self._fw_answers[answer]
            found[answer[1]] = {}
            for layer, chunks in layers.items():
                rows = rows_in_order(chunks)
                found[answer[1]][layer] = (len(rows), rows.numpy().tobytes())
        return found

    def fw_forget(self, key: str) -> None:
        for answer in [k for k in self._fw_answers if k[0] == key]:
            del self._fw_answers[answer]

    def fw_submit_verdicts(self, model_version: str, records: list[dict]) -> None:
        """The replica's verdicts to the collector, as capture's vectors go."""
        verdicts = [pb.Verdict(**record) for record in records]
        self._fw_sender.submit(
            pb.ActivationBatch(
                model=self._fw["model"], model_version=model_version, engine="vllm",
                verdicts=verdicts,
            )
        )  # fmt: skip

    def fw_set_collectors(self, addresses: list[str]) -> None:
        self._fw_collectors = list(addresses)

    def fw_pack(self) -> None:
        """Pack every pending row into messages for the sender. The wait for acks is the
        caller's (it polls fw_stats): this method runs on the thread that runs the
        model, which must not block."""
        self._fw_ship(force=True)

    def fw_stats(self) -> dict:
        self._fw_ship(force=False)
        stats = vars(self._fw_sender.snapshot())
        stats["budget_dropped_vectors"] = self._fw_policy.budget_dropped
        stats["address"] = self._fw_sender.address
        stats["batch_sizes"] = list(self._fw_pass_sizes)
        stats["capture_error"] = self._fw_error
        return stats

    def fw_stop(self) -> None:
        self._fw_ship(force=True)
        self._fw_sender.close(flush_timeout=10.0)

    # ---- inside the forward pass

    def _fw_rows(self):
        """(request ids, query_start_loc) of this forward; None for vLLM's dummy runs."""
        if not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if not metadata:
            return None
        if isinstance(metadata, dict):
            metadata = next(iter(metadata.values()))
        batch = self.model_runner.input_batch
        n = batch.num_reqs
        return list(batch.req_ids[:n]), self.model_runner.query_start_loc.cpu[: n + 1].tolist()

    def _fw_extra(self, engine_id: str) -> dict:
        state = self.model_runner.requests.get(engine_id)
        return getattr(getattr(state, "sampling_params", None), "extra_args", None) or {}

    def _fw_verdict_hook(self, layer: int, site: str):
        def hook(module, inputs, output):
            try:
                self._fw_record_answers(layer, site, output)
            except Exception as err:  # noqa: BLE001 - verdicts must never stop the engine
                log.exception("recording answers failed at layer %d; verdicts are off", layer)
                self._fw_error = f"verdicts, layer {layer}: {type(err).__name__}: {err}"
                self.fw_set_verdicts(None)

        return hook

    def _fw_record_answers(self, layer: int, site: str, output) -> None:
        """Keep the rows of this pass that are generated tokens of verdict requests."""
        if layer == self._fw_verdict_layers[0]:  # the first hook of a pass plans it
            self._fw_plan = self._fw_plan_answers()
        if not self._fw_plan:
            return
        rows, pieces = self._fw_plan
        stream = residual_stream(site, output).detach()
        vectors = stream[rows.to(stream.device)].float().cpu()
        chunks = vectors.split([count for _, _, count in pieces])
        for (answer, first, _), chunk in zip(pieces, chunks, strict=True):
            self._fw_answers.setdefault(answer, {}).setdefault(layer, []).append((first, chunk))
        while len(self._fw_answers) > _ANSWERS_KEPT:
            self._fw_answers.popitem(last=False)

    def _fw_plan_answers(self):
        """(rows, [(answer, its position of the first row, rows)]) of this pass: the rows
        that are generated tokens of verdict requests (a request's rows in a pass are
        consecutive positions, so each is a tail of its rows); None when there are none."""
        found = self._fw_rows()
        if found is None:
            return None
        engine_ids, starts = found
        rows, pieces = [], []
        for k, engine_id in enumerate(engine_ids):
            key = self._fw_extra(engine_id).get(VERDICT_KEY)
            if not isinstance(key, str):
                continue
            prompt = self.model_runner.requests[engine_id].num_prompt_tokens
            first = int(self.model_runner.positions[starts[k]])
            skip = max(0, prompt - first)
            if starts[k] + skip >= starts[k + 1]:
                continue
            rows.append(torch.arange(starts[k] + skip, starts[k + 1]))
            pieces.append((answer_key(engine_id, key), first + skip - prompt,
                           starts[k + 1] - starts[k] - skip))  # fmt: skip
        return (torch.cat(rows), pieces) if rows else None

    def _fw_steered_rows(self, point: tuple[int, str]) -> list:
        """[(rows, terms)] of this pass for the regenerated requests' steers at `point`."""
        found = self._fw_rows()
        if found is None:
            return []
        engine_ids, starts = found
        steered = []
        for k, engine_id in enumerate(engine_ids):
            tags = self._fw_extra(engine_id).get(STEER_KEY)
            if not isinstance(tags, str):
                continue
            terms = [t for tag in tags.split(",")
                     for t in self._fw_regenerate.get(tag, {}).get(point, [])]  # fmt: skip
            if terms:
                steered.append((slice(starts[k], starts[k + 1]), terms))
        return steered

    def _fw_decide(self, engine_id: str) -> tuple[bool, bool]:
        """(chosen, always) for a request, decided once when it is first seen."""
        decision = self._fw_decisions.get(engine_id)
        if decision is None:
            always = bool(self._fw_extra(engine_id).get(ALWAYS_KEY))
            chosen, _ = self._fw_policy.select_requests([always])
            decision = (bool(chosen[0]), always)
            self._fw_decisions[engine_id] = decision
            while len(self._fw_decisions) > _DECISIONS_KEPT:
                self._fw_decisions.popitem(last=False)
        return decision

    def _fw_hook(self, layer: int, site: str):
        def hook(module, inputs, output):
            try:
                self._fw_capture(layer, site, output)
            except Exception as err:  # noqa: BLE001 - capture must never stop the engine
                log.exception("capture failed at layer %d %s; capture is off", layer, site)
                self._fw_error = f"layer {layer} {site}: {type(err).__name__}: {err}"
                self.fw_set_capture(False)

        return hook

    def _fw_capture(self, layer: int, site: str, output) -> None:
        """Sample this pass's rows at (layer, site) and queue them, each under its request
        and position."""
        found = self._fw_rows()
        if found is None:
            return
        engine_ids, starts = found
        total = starts[-1]
        if (layer, site) == self._fw_first_point:
            self._fw_pass_sizes.append(len(engine_ids))
        decisions = [self._fw_decide(rid) for rid in engine_ids]
        counts = [starts[k + 1] - starts[k] for k in range(len(engine_ids))]
        chosen = torch.tensor([d[0] for d in decisions]).repeat_interleave(torch.tensor(counts))
        always = torch.tensor([d[1] for d in decisions]).repeat_interleave(torch.tensor(counts))
        if not chosen.any():
            return
        mask = self._fw_policy.token_mask((total, 1), chosen, always)
        mask = self._fw_policy.apply_budget(mask, always)[:, 0]
        if not mask.any():
            return
        rows = mask.nonzero().squeeze(1)
        stream = residual_stream(site, output)
        vectors = stream.detach()[rows.to(stream.device)].to(self._fw_dtype).cpu()
        # The runner's buffers for this pass: each row's position in its request (a
        # prefix-cache hit starts past the cached blocks) and its token id. On a GPU
        # the device copies are the current ones (async scheduling fills the ids of
        # generated tokens there only); on the CPU both copies are one tensor.
        runner = self.model_runner
        positions = runner.positions[:total][rows.to(runner.positions.device)].tolist()
        token_ids = runner.input_ids.gpu[:total]
        token_ids = token_ids[rows.to(token_ids.device)].tolist()
        owner = torch.arange(len(engine_ids)).repeat_interleave(torch.tensor(counts))[rows]
        keys = [request_key(engine_ids[k]) for k in owner.tolist()]
        with self._fw_lock:
            pending = self._fw_pending.setdefault((layer, site), _Pending())
            pending.vectors.append(vectors)
            pending.request_ids += keys
            pending.positions += positions
            pending.token_ids += token_ids
            pending.rows += len(keys)
        self._fw_ship(force=False)

    def _fw_ship(self, force: bool) -> None:
        """Pack full (or, with force or after flush_after_s, any) pending rows into
        messages for the sender's bounded buffer; never blocks the forward pass."""
        s = self._fw
        now = time.monotonic()
        with self._fw_lock:
            ready = {
                point: pending
                for point, pending in self._fw_pending.items()
                if pending.rows
                and (
                    force
                    or pending.rows >= s["batch_rows"]
                    or now - pending.since >= s["flush_after_s"]
                )
            }
            for point in ready:
                self._fw_pending[point] = _Pending()
        for (layer, site), pending in ready.items():
            vectors = torch.cat(pending.vectors)
            texts = self._fw_tokenizer.batch_decode([[t] for t in pending.token_ids])
            stamp = time.time_ns()
            for start in range(0, pending.rows, s["batch_rows"]):
                end = start + s["batch_rows"]
                keys = pending.request_ids[start:end]
                used = list(dict.fromkeys(keys))
                index = {key: n for n, key in enumerate(used)}
                self._fw_sender.submit(
                    make_batch(
                        vectors[start:end],
                        model=s["model"],
                        model_version=s["model_version"],
                        layer=layer,
                        site=site,
                        request_ids=used,
                        request_index=[index[k] for k in keys],
                        token_pos=pending.positions[start:end],
                        token_id=pending.token_ids[start:end],
                        ts_unix_nanos=[stamp] * len(keys),
                        token_text=texts[start:end],
                        engine="vllm",
                    )
                )


def rows_in_order(chunks: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The rows from answer position 0 on, as far as they run without a gap; a chunk
    that starts before the end (a preempted request computed again) replaces the rest."""
    rows: list[torch.Tensor] = []
    length = 0
    for first, chunk in chunks:
        if first > length:
            break
        if first < length:
            rows, length = [torch.cat(rows)[:first]], first
        rows.append(chunk)
        length += len(chunk)
    return torch.cat(rows) if rows else torch.zeros(0, 0)
