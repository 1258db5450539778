"""Sparse autoencoders in the SAELens file layout: ReLU, TopK, JumpReLU and BatchTopK.

Files: `cfg.json` + `sae_weights.safetensors` holding W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in], and `threshold` [d_sae] for JumpReLU.
The cfg uses SAELens's keys and architecture names (`standard` is ReLU), so files move
both ways between SAELens and featurewatch.

Every architecture computes the same pre-activations, `(x - b_dec) @ W_enc + b_enc`
(b_dec subtracted only with apply_b_dec_to_input), and differs only in which of them
stay active:
- standard (ReLU): relu(pre)
- topk: the k largest pre-activations, then ReLU (SAELens's TopK)
- jumprelu: relu(pre) where pre > threshold, per latent
- BatchTopK trains with the k x batch largest activations across a whole batch and, as
  SAELens and the papers do, infers as a JumpReLU with the learned threshold; it is
  saved as `jumprelu` (metadata says it was trained as batchtopk).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from featurewatch.errors import MAX_FILE_BYTES, SAEFormatError, parse_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# SAELens reads a cfg without this as a pre-6.0 file and rewrites its keys; we write the
# 6.x layout.
SAELENS_LAYOUT_VERSION = "6.0.0"


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


class SparseAutoencoder(nn.Module):
    """x -> sparse latents -> reconstruction. Subclasses choose which latents stay active."""

    architecture: ClassVar[str]
    extra_tensors: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        apply_b_dec_to_input: bool = True,
        dtype: torch.dtype = torch.float32,
        metadata: dict | None = None,
    ):
        super().__init__()
        if d_in <= 0 or d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {d_in}, {d_sae}")
        self.d_in, self.d_sae = d_in, d_sae
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.metadata = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    # ---- encode / decode

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.addmm(self.b_enc, x, self.W_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Dense latents from pre-activations."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents [batch, d_sae]."""
        return self.activate(self.pre_activations(x))

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values), each [batch, L]: every active latent of each row, padded
        with zero values where a row has fewer than L (the batch's most) active."""
        return sparse_from_dense(self.encode(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_dec, z.to(self.dtype), self.W_dec)

    def decode_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Decode from (indices, values): sums the active decoder rows, no dense product."""
        if indices.shape[1] == 0:
            return self.b_dec.expand(indices.shape[0], -1).clone()
        out = F.embedding_bag(
            indices, self.W_dec, per_sample_weights=values.to(self.dtype), mode="sum"
        )
        return out + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ---- files

    def config(self) -> dict:
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": dtype_name(self.dtype),
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {"sae_lens_version": SAELENS_LAYOUT_VERSION, **self.metadata},
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous() for name, p in self.named_parameters()}
        save_file(tensors, str(path / WEIGHTS_FILE))
        (path / CFG_FILE).write_text(json.dumps(self.config(), indent=2))
        return path


TOPK_BLOCK = 32


def row_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row, in no particular order;
    the same set as `pre.topk(k, sorted=False)` (up to ties), about 1.5x faster on wide
    rows.

    A row's top k lie in the k blocks (of TOPK_BLOCK columns) with the largest block
    maxima: any other block's maximum is below k block maxima, hence below k entries.
    So one pass takes block maxima, and the exact top-k runs over only k x TOPK_BLOCK
    candidates. Values are gathered from `pre`, so gradients flow as with `topk`."""
    rows, width = pre.shape
    n_blocks = width // TOPK_BLOCK
    if width % TOPK_BLOCK or n_blocks < 2 * k:
        return pre.topk(k, dim=-1, sorted=False)
    with torch.no_grad():
        blocks = pre.detach().view(rows * n_blocks, TOPK_BLOCK)
        best_blocks = blocks.amax(dim=-1).view(rows, n_blocks).topk(k, dim=-1, sorted=False)
        block_ids = best_blocks.indices
        flat = (block_ids + torch.arange(rows).unsqueeze(1) * n_blocks).view(-1)
        candidates = blocks.index_select(0, flat).view(rows, k * TOPK_BLOCK)
        pick = candidates.topk(k, dim=-1, sorted=False).indices
        indices = block_ids.gather(1, pick // TOPK_BLOCK) * TOPK_BLOCK + pick % TOPK_BLOCK
    return pre.gather(1, indices), indices


def sparse_from_dense(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every nonzero of each row of dense latents, padded to the batch's widest row."""
    width = int((z > 0).sum(dim=-1).max()) if z.numel() else 0
    values, indices = z.topk(width, dim=-1, sorted=False)
    return indices, values


class ReLUSAE(SparseAutoencoder):
    """SAELens's `standard` architecture: every positive pre-activation is active."""

    architecture = "standard"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre)


class TopKSAE(SparseAutoencoder):
    """The k largest pre-activations, then ReLU."""

    architecture = "topk"

    def __init__(self, d_in: int, d_sae: int, k: int, **kwargs):
        super().__init__(d_in, d_sae, **kwargs)
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        self.k = k

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values), each [batch, k]; values are >= 0 (zeros are inactive)."""
        values, indices = row_topk(self.pre_activations(x), self.k)
        return indices, F.relu(values)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = row_topk(pre, self.k)
        return torch.zeros_like(pre).scatter_(-1, indices, F.relu(values))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_sparse(*self.encode_sparse(x))

    def config(self) -> dict:
        return {**super().config(), "k": self.k, "rescale_acts_by_decoder_norm": False}


class JumpReLUSAE(SparseAutoencoder):
    """relu(pre) where pre exceeds a learned per-latent threshold."""

    architecture = "jumprelu"
    extra_tensors = ("threshold",)

    def __init__(self, d_in: int, d_sae: int, **kwargs):
        super().__init__(d_in, d_sae, **kwargs)
        self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=self.W_enc.dtype))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre) * (pre > self.threshold).to(pre.dtype)


class BatchTopKSAE(JumpReLUSAE):
    """Trains with the k x batch largest activations across the batch; infers as JumpReLU.

    While training, `threshold` follows an exponential moving average of the smallest
    activation kept (one value for every latent, as SAELens does), so the saved model
    fires about k latents per token without needing a batch.
    """

    def __init__(self, d_in: int, d_sae: int, k: int, threshold_lr: float = 0.01, **kwargs):
        super().__init__(d_in, d_sae, **kwargs)
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        self.k, self.threshold_lr = k, threshold_lr
        self.threshold.requires_grad_(False)
        self.metadata.setdefault("trained_as", "batchtopk")
        self.metadata.setdefault("k", k)
        self._threshold_initialised = False

    def reset_threshold(self) -> None:
        """Forget the learned threshold (after the weights changed under it)."""
        with torch.no_grad():
            self.threshold.zero_()
        self._threshold_initialised = False

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().activate(pre)
        acts = F.relu(pre)
        flat = acts.flatten()
        values, indices = flat.topk(min(self.k * acts.shape[0], flat.numel()), sorted=False)
        kept = torch.zeros_like(flat).scatter_(-1, indices, values).view_as(acts)
        positive = values[values > 0]
        if positive.numel():
            with torch.no_grad():
                smallest = positive.min().to(self.threshold.dtype)
                if not self._threshold_initialised:
                    self.threshold.fill_(smallest)
                    self._threshold_initialised = True
                else:
                    lr = self.threshold_lr
                    self.threshold.mul_(1 - lr).add_(lr * smallest)
        return kept


SAE = SparseAutoencoder
ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {
    "standard": ReLUSAE,
    "topk": TopKSAE,
    "jumprelu": JumpReLUSAE,
}


def build(architecture: str, d_in: int, d_sae: int, *, k: int | None = None, **kwargs):
    """A fresh SAE by name: `standard`/`relu`, `topk`, `batchtopk` or `jumprelu`."""
    arch = {"relu": "standard"}.get(architecture, architecture)
    if arch == "topk":
        return TopKSAE(d_in, d_sae, k, **kwargs)
    if arch == "batchtopk":
        return BatchTopKSAE(d_in, d_sae, k, **kwargs)
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch](d_in, d_sae, **kwargs)
    raise ValueError(
        f"unknown SAE architecture {architecture!r}; "
        "expected standard (relu), topk, batchtopk or jumprelu"
    )


def load(path: str | Path, *, expected_d_in: int | None = None) -> SparseAutoencoder:
    """Load an SAE folder in the SAELens layout; refuse anything malformed by name."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise SAEFormatError(f"{path}: missing {CFG_FILE}")
    if not weights_path.is_file():
        raise SAEFormatError(f"{path}: missing {WEIGHTS_FILE}")
    if cfg_path.stat().st_size > MAX_FILE_BYTES:
        raise SAEFormatError(f"{cfg_path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        cfg = parse_json(cfg_path.read_bytes())
    except ValueError as err:  # JSONDecodeError too
        raise SAEFormatError(f"{cfg_path}: not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise SAEFormatError(f"{cfg_path}: must hold a JSON object")
    arch = cfg.get("architecture")
    if not isinstance(arch, str) or arch not in ARCHITECTURES:
        raise SAEFormatError(
            f"{cfg_path}: unknown architecture {arch!r}; supported: {sorted(ARCHITECTURES)}"
        )
    required = ("d_in", "d_sae", "k") if arch == "topk" else ("d_in", "d_sae")
    for key in required:
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] <= 0:
            raise SAEFormatError(f"{cfg_path}: {key} must be a positive integer")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    if arch == "topk" and cfg["k"] > d_sae:
        raise SAEFormatError(f"{cfg_path}: k = {cfg['k']} exceeds d_sae = {d_sae}")
    if expected_d_in is not None and d_in != expected_d_in:
        raise SAEFormatError(
            f"{path}: d_in is {d_in} but the monitored layer has width {expected_d_in}"
        )
    named = cfg.get("dtype", "float32")
    dtype = DTYPES.get(named) if isinstance(named, str) else None
    if dtype is None:
        raise SAEFormatError(f"{cfg_path}: unknown dtype {cfg.get('dtype')!r}")
    metadata = cfg.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise SAEFormatError(f"{cfg_path}: metadata must be a JSON object")
    # Settings that would change what the weights mean: refused, not silently ignored.
    for key, supported in (
        ("normalize_activations", "none"),
        ("reshape_activations", "none"),
        ("rescale_acts_by_decoder_norm", False),
    ):
        if cfg.get(key, supported) != supported:
            raise SAEFormatError(
                f"{cfg_path}: {key} = {cfg[key]!r} is not supported (only {supported!r})"
            )
    # The shapes cfg.json implies, checked against the file's header before anything of
    # that size is allocated (a cfg.json claiming billions of latents must not be).
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in build(
            arch, d_in, d_sae, k=cfg.get("k"), dtype=dtype).named_parameters()}  # fmt: skip
    try:
        with safe_open(str(weights_path), "pt") as header:
            stored = {name: tuple(header.get_slice(name).get_shape()) for name in header.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises several types for a corrupt file
        raise SAEFormatError(f"{weights_path}: unreadable: {err}") from None
    for name, shape in shapes.items():
        if name not in stored:
            raise SAEFormatError(f"{weights_path}: missing tensor {name}")
        if stored[name] != shape:
            raise SAEFormatError(
                f"{weights_path}: {name} has shape {stored[name]}, cfg.json implies {shape}"
            )
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises several types for a corrupt file
        raise SAEFormatError(f"{weights_path}: unreadable: {err}") from None
    sae = build(
        arch,
        d_in,
        d_sae,
        k=cfg.get("k"),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        dtype=dtype,
        metadata={k: v for k, v in metadata.items() if k != "sae_lens_version"},
    )
    expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    for name, shape in expected.items():
        if name not in tensors:
            raise SAEFormatError(f"{weights_path}: missing tensor {name}")
        if tuple(tensors[name].shape) != shape:
            raise SAEFormatError(
                f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, "
                f"cfg.json implies {shape}"
            )
        if not torch.isfinite(tensors[name]).all():
            raise SAEFormatError(f"{weights_path}: {name} contains NaN or Inf")
    with torch.no_grad():
        for name in expected:
            getattr(sae, name).copy_(tensors[name].to(dtype))
    return sae.eval()
