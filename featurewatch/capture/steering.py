"""Steering: push SAE features down inside a live model, one forward hook per site.

A steer names a feature by its decoder direction d (the SAE's W_dec row) and changes the
site's output h at every token:

- `subtract`: h - scale * d / |d|, a constant push against the feature's direction;
- `clamp`: h - scale * a(h) * d, where a(h) = relu(h . w + b) is the feature's activation
  read with its encoder column w and bias b (b_dec folded into b). With scale 1 this
  removes what the feature adds to h; above 1 it pushes the feature negative.

Hooks are registered once per (layer, site) and put before the capture hooks, so what
monitoring samples is the steered stream. Changing the steers swaps one dict, so a
generation in flight picks the change up from its next forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import nn

from featurewatch.capture.hooks import SITES, find_decoder_layers, site_module

MODES = ("subtract", "clamp")


@dataclass(frozen=True)
class Steer:
    layer: int
    site: str
    feature_id: int
    mode: Literal["subtract", "clamp"]
    scale: float
    direction: tuple[float, ...]  # the decoder row W_dec[feature_id]
    encoder: tuple[float, ...] = ()  # W_enc[:, feature_id], for clamp
    encoder_bias: float = 0.0  # b_enc[feature_id] - b_dec . W_enc[:, feature_id]
    sae_version: str | None = None

    @classmethod
    def from_dict(cls, fields: dict) -> Steer:
        """From JSON (a Serve user_config): lists back to tuples; unknown keys refused."""
        if not isinstance(fields, dict):
            raise ValueError("a steer must be a mapping")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("direction", "encoder")}


def steer_from_sae(
    sae,
    feature_id: int,
    *,
    layer: int,
    site: str,
    mode: str = "subtract",
    scale: float = 1.0,
    sae_version: str | None = None,
) -> Steer:
    """The steer for one feature of an SAE (a featurewatch.sae SparseAutoencoder)."""
    if not 0 <= feature_id < sae.d_sae:
        raise ValueError(f"feature {feature_id} is not in the SAE (d_sae {sae.d_sae})")
    w = sae.W_enc[:, feature_id].detach().float()
    bias = float(sae.b_enc[feature_id].detach())
    if sae.apply_b_dec_to_input:
        bias -= float(sae.b_dec.detach().float() @ w)
    return Steer(
        layer=layer,
        site=site,
        feature_id=feature_id,
        mode=mode,
        scale=scale,
        direction=tuple(sae.W_dec[feature_id].detach().float().tolist()),
        encoder=tuple(w.tolist()),
        encoder_bias=bias,
        sae_version=sae_version,
    )


def check_steer(steer: Steer, width: int, layers: int) -> None:
    """ValueError naming the field when a steer does not fit the model."""
    if steer.mode not in MODES:
        raise ValueError(f"steering.mode must be one of {', '.join(MODES)}, not {steer.mode!r}")
    if steer.site not in SITES:
        raise ValueError(f"steering.site must be one of {', '.join(SITES)}, not {steer.site!r}")
    if not 0 <= steer.layer < layers:
        raise ValueError(f"steering.layer {steer.layer} is out of range: the model has {layers}")
    if not steer.scale > 0:
        raise ValueError(f"steering.scale must be positive, not {steer.scale}")
    if len(steer.direction) != width:
        raise ValueError(
            f"steering.direction has {len(steer.direction)} values, the model's width is {width}"
        )
    if steer.mode == "clamp" and len(steer.encoder) != width:
        raise ValueError(f"steering.encoder must have {width} values for clamp")
    direction = torch.tensor(steer.direction)
    if not torch.isfinite(direction).all() or direction.norm() == 0:
        raise ValueError("steering.direction must be finite and non-zero")


def first_element(site: str, output):
    """What a transformers block or MLP hook sees as its output tensor."""
    return output[0] if isinstance(output, tuple) else output


class Steering:
    """The steers active in one model; `set()` replaces them all (empty: steering off)."""

    def __init__(self, model: nn.Module, stream=None):
        # stream(site, output): the tensor a site's steers read and change (by default
        # the output, or its first element); vLLM's blocks return (mlp_out, residual),
        # whose sum is the residual stream.
        self.stream = stream or first_element
        self.blocks = find_decoder_layers(model)
        self.width = int(model.config.hidden_size)
        self._hooked: set[tuple[int, str]] = set()
        self._active: dict[tuple[int, str], list[tuple]] = {}
        self._extra: dict[tuple[int, str], list[tuple]] = {}
        # rows_for(point) -> [(row indices, terms)]: steers for some rows of a forward
        # only (vLLM's regenerated requests share passes with others).
        self.rows_for = None
        self.steers: list[Steer] = []

    def set(self, steers: list[Steer]) -> None:
        active = self._terms(steers)
        self._active = active  # one assignment: a forward sees the old or the new set
        self.steers = list(steers)

    @contextlib.contextmanager
    def adding(self, steers: list[Steer]):
        """These steers as well as the set ones, for the forwards run inside (a
        regenerated answer); a `set()` meanwhile replaces only the set ones."""
        self._extra = self._terms(steers)
        try:
            yield
        finally:
            self._extra = {}

    def terms(self, steers: list[Steer]) -> dict[tuple[int, str], list[tuple]]:
        """Each steer's term by (layer, site), with a hook at every such point: what
        `rows_for` hands back for the rows a steer applies to."""
        return self._terms(steers)

    def _terms(self, steers: list[Steer]) -> dict[tuple[int, str], list[tuple]]:
        for steer in steers:
            check_steer(steer, self.width, len(self.blocks))
        active: dict[tuple[int, str], list[tuple]] = {}
        for steer in steers:
            direction = torch.tensor(steer.direction, dtype=torch.float32)
            if steer.mode == "subtract":
                term = (steer.mode, steer.scale * direction / direction.norm(), None, 0.0)
            else:
                encoder = torch.tensor(steer.encoder, dtype=torch.float32)
                term = (steer.mode, steer.scale * direction, encoder, steer.encoder_bias)
            active.setdefault((steer.layer, steer.site), []).append(term)
        for point in active:
            if point not in self._hooked:
                module = site_module(self.blocks[point[0]], point[1])
                module.register_forward_hook(self._make_hook(point), prepend=True)
                self._hooked.add(point)
        return active

    def _make_hook(self, point: tuple[int, str]):
        def hook(module, inputs, output):
            terms = self._active.get(point, []) + self._extra.get(point, [])
            rowed = self.rows_for(point) if self.rows_for is not None else []
            if not terms and not rowed:
                return None
            hidden = self.stream(point[1], output).float()
            steered = _steer(hidden, terms)
            if rowed:
                steered = steered.clone() if steered is hidden else steered
                for rows, extra in rowed:
                    steered[rows] = _steer(steered[rows], extra)
            # The change goes onto the output's first element: that is the stream itself,
            # or (vLLM) one of the two summands of it.
            first = first_element(point[1], output)
            if self.stream is first_element:
                changed = steered.to(first.dtype)
            else:
                changed = (first.float() + (steered - hidden)).to(first.dtype)
            if isinstance(output, tuple):
                return (changed, *output[1:])
            return changed

        return hook


def _steer(hidden: torch.Tensor, terms: list[tuple]) -> torch.Tensor:
    """`hidden` with each term applied in turn (a new tensor; `hidden` itself without)."""
    steered, device = hidden, hidden.device
    for mode, push, encoder, bias in terms:
        if mode == "subtract":
            steered = steered - push.to(device)
        else:
            activation = torch.relu(steered @ encoder.to(device) + bias)
            steered = steered - activation.unsqueeze(-1) * push.to(device)
    return steered
