"""Forward hooks that copy sampled token positions from any transformers causal LM.

Works for prompt and generated tokens alike: the first forward after `start()` is the
prefill (padded prompt, masked by the attention mask); each later forward is one
KV-cached decode step, whose positions continue from a per-layer cursor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from featurewatch.capture.sampler import SamplingPolicy

SITES = ("resid_post", "mlp_out")


@dataclass
class CapturedChunk:
    """Vectors copied by one hook call: row in the batch and absolute padded position."""

    layer: int
    site: str
    rows: torch.Tensor  # int64 [n]
    positions: torch.Tensor  # int64 [n]
    vectors: torch.Tensor  # [n, d_model], store dtype


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a Llama-, Mistral-, Qwen-, GPT-2- or NeoX-style LM."""
    candidates = (
        ("model", "layers"),  # Llama, Mistral, Qwen, Gemma
        ("transformer", "h"),  # GPT-2, GPT-J
        ("gpt_neox", "layers"),  # Pythia
        ("model", "decoder", "layers"),  # OPT
    )
    for path in candidates:
        module = model
        for name in path:
            module = getattr(module, name, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def num_layers(model: nn.Module) -> int:
    return len(find_decoder_layers(model))


def site_module(block: nn.Module, site: str) -> nn.Module:
    if site == "resid_post":
        return block
    if site == "mlp_out":
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            raise ValueError(f"{type(block).__name__} has no .mlp for site mlp_out")
        return mlp
    raise ValueError(f"unknown capture site {site!r}; expected one of {SITES}")


class ActivationCapture:
    """Copies sampled positions at every (layer, site) while attached (a context manager)."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[int],
        site: str | list[str] = "resid_post",
        sampler: SamplingPolicy | None = None,
        store_dtype: torch.dtype = torch.float16,
    ):
        blocks = find_decoder_layers(model)
        for layer in layers:
            if not 0 <= layer < len(blocks):
                raise ValueError(
                    f"capture.layer {layer} is out of range: the model has {len(blocks)} layers"
                )
        sites = [site] if isinstance(site, str) else list(site)
        self.points = [(layer, s) for layer in layers for s in sites]
        self.sampler = sampler or SamplingPolicy(1.0)
        self.store_dtype = store_dtype
        self._modules = {(layer, s): site_module(blocks[layer], s) for layer, s in self.points}
        self._handles: list = []
        self._active = False
        self._prefill_mask: torch.Tensor | None = None
        self._chosen: torch.Tensor | None = None
        self._always: torch.Tensor | None = None
        self._cursor: dict[tuple[int, str], int] = {}
        self._chunks: list[CapturedChunk] = []

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.points})

    def __enter__(self) -> ActivationCapture:
        for point, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(point)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False

    def start(
        self,
        attention_mask: torch.Tensor | None = None,
        chosen: torch.Tensor | None = None,
        always: torch.Tensor | None = None,
    ) -> None:
        """Begin one generate/forward call.

        `attention_mask` marks the prompt's real tokens; `chosen` and `always` are the
        per-row request decisions of the sampling policy (None: every row eligible).
        """
        self._active = True
        self._prefill_mask = attention_mask.bool() if attention_mask is not None else None
        self._chosen, self._always = chosen, always
        self._cursor = {point: 0 for point in self.points}
        self._chunks = []

    def finish(self) -> list[CapturedChunk]:
        """End the call and hand over what was copied."""
        self._active = False
        chunks, self._chunks = self._chunks, []
        return chunks

    def _make_hook(self, point: tuple[int, str]):
        layer, site = point

        def hook(module, inputs, output):
            if not self._active:
                return
            hidden = output[0] if isinstance(output, tuple) else output
            batch, seq, _ = hidden.shape
            cursor = self._cursor[point]
            self._cursor[point] = cursor + seq
            if self._chosen is not None and not self._chosen.any():
                return  # no row of this call was chosen: nothing to draw or copy
            mask = self.sampler.token_mask((batch, seq), self._chosen, self._always)
            if cursor == 0 and self._prefill_mask is not None:
                mask &= self._prefill_mask[:, :seq]  # never sample left padding
            mask = self.sampler.apply_budget(mask, self._always)
            if not mask.any():
                return
            rows, cols = mask.nonzero(as_tuple=True)
            # Advanced indexing copies, so the model may reuse its buffers afterwards.
            vectors = hidden.detach()[rows, cols].to(self.store_dtype)
            self._chunks.append(CapturedChunk(layer, site, rows, cols + cursor, vectors))

        return hook


class StopForward(Exception):
    """Raised by the hook once the monitored site has run: the later layers and the LM
    head are not needed, and skipping them halves the cost of a mid-depth layer."""


class SiteRecorder:
    """Forward hooks that keep the output of (layer, site), and of `more_layers` at the
    same site, and end the forward after the deepest of them."""

    def __init__(self, model, layer: int, site: str, more_layers: tuple[int, ...] = ()):
        self.layer = layer
        self.outputs: dict[int, torch.Tensor] = {}
        layers = sorted({layer, *more_layers})
        blocks = find_decoder_layers(model)
        self._deepest = layers[-1]
        self._handles = [
            site_module(blocks[at], site).register_forward_hook(self._hook_for(at)) for at in layers
        ]

    def _hook_for(self, layer: int):
        def hook(module, inputs, output):
            self.outputs[layer] = (output[0] if isinstance(output, tuple) else output).detach()
            if layer == self._deepest:
                raise StopForward

        return hook

    @property
    def output(self) -> torch.Tensor | None:
        return self.outputs.get(self.layer)

    def run(self, model, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The output at `layer` (every recorded layer's is in `outputs`)."""
        self.outputs = {}
        with contextlib.suppress(StopForward):
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        assert self.output is not None
        return self.output

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class ResponseRecorder:
    """Forward hooks that keep, at each of `layers`, the output of every decode step of a
    generate call: the residual stream of each generated token, as it is fed back in.
    The prefill (the prompt) is skipped. Registered after steering's hooks, so it sees
    the steered stream the model computes."""

    def __init__(self, model: nn.Module, layers: list[int], site: str = "resid_post"):
        blocks = find_decoder_layers(model)
        self.layers = sorted(set(layers))
        self._steps: dict[int, list[torch.Tensor]] = {}
        self._prefilled: set[int] = set()
        self._active = False
        self._handles = [
            site_module(blocks[at], site).register_forward_hook(self._hook_for(at))
            for at in self.layers
        ]

    def _hook_for(self, layer: int):
        def hook(module, inputs, output):
            if not self._active:
                return
            if layer not in self._prefilled:
                self._prefilled.add(layer)
                return
            hidden = output[0] if isinstance(output, tuple) else output
            self._steps[layer].append(hidden[:, -1].detach().clone())

        return hook

    def start(self) -> None:
        self._steps = {at: [] for at in self.layers}
        self._prefilled = set()
        self._active = True

    def finish(self) -> dict[int, torch.Tensor]:
        """layer -> [batch, decode steps, width]: step k holds generated token k."""
        self._active = False
        steps, self._steps = self._steps, {}
        return {at: torch.stack(s, dim=1) if s else torch.zeros(0) for at, s in steps.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
