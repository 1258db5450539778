"""In-line verdicts on the vLLM engine: what the replica does to a request, its answer
and its stream so that every answer is scored on all its tokens (analysis/verdicts.py
scores; capture/vllm_worker.py records).

vLLM computes a token's residual stream when the token is fed back in, so the last
token of an answer cut at max_tokens is never computed. As the transformers replica
runs one decode step more, this one asks vLLM for one token more than the client did
and cuts the answer back here: text, token ids, logprobs, finish_reason and usage are
what the client would have had. A token that ended an answer (end of sequence, a stop
token) is not part of its text and is not scored; nor is the one that completed a stop
string (never fed in either).

Streams: every `every` tokens the answer so far is scored; a crossed threshold under a
block or regenerate gate ends the stream with finish_reason content_filter (text already
sent stays sent, so a stream cannot be regenerated). The final chunk of each choice
carries its verdict; a header cannot, as headers go before the first token.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

import torch

from featurewatch.analysis.verdicts import REFUSAL
from featurewatch.capture.vllm_worker import RESERVED_PREFIX, STEER_KEY, VERDICT_KEY


@dataclass
class Answering:
    """One request scored in-line: the worker's key for its answers, and the limit the
    client asked for (the engine runs one token more)."""

    key: str
    wanted: int
    client_ids: bool  # the client asked for token ids itself
    original: object = None  # the request as the client made it (regenerate asks again)


def check_xargs(request) -> None:
    """vllm_xargs a client may not set: featurewatch's own (always-sample, verdicts,
    regenerate steering)."""
    reserved = [k for k in request.vllm_xargs or {} if k.startswith(RESERVED_PREFIX)]
    if reserved:
        raise ValueError(f"vllm_xargs: {reserved} are reserved for featurewatch")


def prepare(request, wanted: int, steer_tags: list[str] | None = None) -> Answering:
    """Mark `request` for recording (and, regenerating, for its tags' steering), with one
    token more than `wanted` and its token ids returned."""
    answering = Answering(uuid.uuid4().hex, wanted, bool(request.return_token_ids))
    xargs = {**(request.vllm_xargs or {}), VERDICT_KEY: answering.key}
    if steer_tags:
        xargs[STEER_KEY] = ",".join(steer_tags)
        # Prompt blocks cached unsteered must not stand in for steered ones.
        request.cache_salt = f"featurewatch-steer:{xargs[STEER_KEY]}"
    request.vllm_xargs = xargs
    if getattr(request, "max_completion_tokens", None) is not None:
        request.max_completion_tokens = None
    request.max_tokens = wanted + 1
    request.return_token_ids = True
    return answering


def _text_key(choice: dict) -> tuple[dict, str]:
    """(the dict holding the choice's text, its key): chat or completion, whole or
    streamed."""
    for holder in ("message", "delta"):
        if isinstance(choice.get(holder), dict):
            return choice[holder], "content"
    return choice, "text"


def _cut_logprobs(logprobs, keep: int) -> None:
    if not isinstance(logprobs, dict):
        return
    for values in logprobs.values():  # chat: content; completion: parallel lists
        if isinstance(values, list):
            del values[keep:]


def cut(choice: dict, answering: Answering, decode) -> int:
    """Cut a whole answer's choice back to the client's limit; the tokens removed."""
    ids = choice.get("token_ids") or []
    extra = len(ids) - answering.wanted
    if extra <= 0:
        return 0
    holder, key = _text_key(choice)
    full, kept = decode(ids), decode(ids[: answering.wanted])
    text = holder.get(key) or ""
    holder[key] = text[: len(text) - len(full)] + kept if text.endswith(full) else kept
    choice["token_ids"] = ids[: answering.wanted]
    choice["finish_reason"], choice["stop_reason"] = "length", None
    _cut_logprobs(choice.get("logprobs"), answering.wanted)
    return extra


def scored_tokens(choice: dict, n_ids: int) -> int:
    """How many of an answer's `n_ids` tokens are its text and were computed: all of
    them, but the one that stopped it."""
    return max(0, n_ids - (choice.get("finish_reason") == "stop"))


def fix_usage(body: dict, removed: int) -> None:
    usage = body.get("usage")
    if isinstance(usage, dict) and removed:
        usage["completion_tokens"] -= removed
        usage["total_tokens"] -= removed


def hide_ids(body: dict, answering: Answering) -> None:
    """Token ids were asked for here: the client gets them only if it asked too."""
    if answering.client_ids:
        return
    body.pop("prompt_token_ids", None)
    for choice in body.get("choices") or []:
        choice.pop("token_ids", None)


def events(piece: str) -> list[str]:
    """The data of each server-sent event in a piece of vLLM's stream."""
    return [line[6:] for line in piece.split("\n") if line.startswith("data: ")]


def event(data) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass
class StreamedChoice:
    """One choice of a stream as it goes: its token ids, its text sent so far, where it
    was last checked, and whether it has ended (finished, or stopped by a gate)."""

    ids: list[int] = field(default_factory=list)
    sent: str = ""
    checked: int = 0
    ended: bool = False

    def take(self, choice: dict, answering: Answering, decode) -> int:
        """Take a chunk's choice: cut it at the client's limit as `cut` does (then it
        ends the choice); the tokens removed."""
        new = choice.get("token_ids") or []
        room = answering.wanted - len(self.ids)
        holder, key = _text_key(choice)
        if len(new) <= room:
            self.ids += new
            self.sent += holder.get(key) or ""
            return 0
        self.ids += new[:room]
        kept = decode(self.ids)
        # The text of the tokens kept that was not sent yet (vLLM may hold text back
        # while a character's bytes are incomplete).
        holder[key] = kept[len(self.sent) :] if kept.startswith(self.sent) else ""
        self.sent += holder[key]
        choice["token_ids"] = new[:room]
        choice["finish_reason"], choice["stop_reason"] = "length", None
        _cut_logprobs(choice.get("logprobs"), room)
        return len(new) - room


def answer_id(body: dict, choice: dict) -> str:
    """The lake's request id of a choice, as capture names its rows (capture/vllm_worker.py
    request_key): the response id, with `#index` for the second choice on."""
    return body["id"] if choice["index"] == 0 else f"{body['id']}#{choice['index']}"


def refuse(choice: dict, text: str = REFUSAL) -> None:
    """The block gate: a whole answer replaced by a refusal, or (a stream stopped) a
    chunk's text withheld."""
    holder, key = _text_key(choice)
    holder[key] = text
    choice["finish_reason"], choice["stop_reason"] = "content_filter", None
    choice.pop("token_ids", None)
    choice.pop("logprobs", None)


def answer_rows(recorded: dict, index: int, n: int, layers: list[int], width: int) -> dict:
    """Layer -> [tokens, width] for choice `index` of what the worker's fw_answer gave:
    its first `n` tokens, or as many as every layer has (fewer: a stream's last token,
    or settings changed mid-answer)."""
    found = recorded.get(index) or {}
    have = min([n] + [found[at][0] if at in found else 0 for at in layers])
    if not have:
        return {at: torch.zeros(0, width) for at in layers}
    return {at: torch.frombuffer(bytearray(found[at][1]), dtype=torch.float32)
            .view(-1, width)[:have] for at in layers}  # fmt: skip
