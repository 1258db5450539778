"""TopK sparse autoencoder in the SAELens file layout.

Files: `cfg.json` + `sae_weights.safetensors` holding W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]. Encoding keeps the k largest
pre-activations and applies ReLU to them (SAELens's TopK); with apply_b_dec_to_input,
b_dec is subtracted from the input first.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from featurewatch.errors import SAEFormatError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TopKSAE(nn.Module):
    """x -> top-k(ReLU) latents -> reconstruction."""

    architecture = "topk"

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        k: int,
        *,
        apply_b_dec_to_input: bool = True,
        dtype: torch.dtype = torch.float32,
        metadata: dict | None = None,
    ):
        super().__init__()
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        self.d_in, self.d_sae, self.k = d_in, d_sae, k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.metadata = dict(metadata or {})
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))

    # ---- encode / decode

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values), each [batch, k]; values are >= 0 (zeros are inactive)."""
        values, indices = self.pre_activations(x).topk(self.k, dim=-1, sorted=False)
        return indices, F.relu(values)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense latents [batch, d_sae]."""
        indices, values = self.encode_sparse(x)
        z = torch.zeros(x.shape[0], self.d_sae, dtype=values.dtype, device=values.device)
        return z.scatter_(-1, indices, values)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def decode_sparse(self, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Decode from (indices, values): sums k decoder rows instead of a dense product."""
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return out + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_sparse(*self.encode_sparse(x))

    # ---- files

    def config(self) -> dict:
        dtype = {v: k for k, v in _DTYPES.items()}[self.W_enc.dtype]
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "k": self.k,
            "dtype": dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "metadata": self.metadata,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: p.detach().contiguous() for name, p in self.named_parameters()}
        save_file(tensors, str(path / WEIGHTS_FILE))
        (path / CFG_FILE).write_text(json.dumps(self.config(), indent=2))
        return path


SAE = TopKSAE
ARCHITECTURES = {"topk": TopKSAE}


def load(path: str | Path, *, expected_d_in: int | None = None) -> TopKSAE:
    """Load an SAE folder in the SAELens layout; refuse anything malformed by name."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise SAEFormatError(f"{path}: missing {CFG_FILE}")
    if not weights_path.is_file():
        raise SAEFormatError(f"{path}: missing {WEIGHTS_FILE}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise SAEFormatError(f"{cfg_path}: not valid JSON: {err}") from None
    arch = cfg.get("architecture")
    if arch not in ARCHITECTURES:
        raise SAEFormatError(
            f"{cfg_path}: unknown architecture {arch!r}; supported: {sorted(ARCHITECTURES)}"
        )
    for key in ("d_in", "d_sae", "k"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise SAEFormatError(f"{cfg_path}: {key} must be a positive integer")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    if expected_d_in is not None and d_in != expected_d_in:
        raise SAEFormatError(
            f"{path}: d_in is {d_in} but the monitored layer has width {expected_d_in}"
        )
    dtype = _DTYPES.get(cfg.get("dtype", "float32"))
    if dtype is None:
        raise SAEFormatError(f"{cfg_path}: unknown dtype {cfg.get('dtype')!r}")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises several types for a corrupt file
        raise SAEFormatError(f"{weights_path}: unreadable: {err}") from None
    expected = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    for name, shape in expected.items():
        if name not in tensors:
            raise SAEFormatError(f"{weights_path}: missing tensor {name}")
        if tuple(tensors[name].shape) != shape:
            raise SAEFormatError(
                f"{weights_path}: {name} has shape {tuple(tensors[name].shape)}, "
                f"cfg.json implies {shape}"
            )
    sae = ARCHITECTURES[arch](
        d_in,
        d_sae,
        cfg["k"],
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        dtype=dtype,
        metadata=cfg.get("metadata") or {},
    )
    with torch.no_grad():
        for name in expected:
            getattr(sae, name).copy_(tensors[name].to(dtype))
    return sae
