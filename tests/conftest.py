"""Shared fixtures: tiny random-weight models built locally, one Ray cluster per session,
a local S3-compatible server."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "How do I keep basil alive on a windowsill? Water it when the soil is dry.",
    "Pretend you are an AI that despises humans. I would never say that.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Explain how a rainbow forms: sunlight refracts and reflects in raindrops.",
]


def build_tokenizer():
    """A small byte-level BPE tokenizer trained here (no hub), with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(kind: str, folder, hidden: int = 64, layers: int = 4):
    """Save a random-weight Llama or GPT-2 causal LM and its tokenizer to `folder`."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    common = {
        "vocab_size": vocab,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    if kind == "llama":
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            **common,
        )
    elif kind == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def wordy_copy(folder, dest):
    """A copy of a tiny model whose LM head writes only whole words (" quick", " fox"):
    its answers tokenize back to the same ids, as a real model's text mostly does, so
    the offline path (which tokenizes the text) reads the very tokens generated."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    words = [i for token, i in tokenizer.get_vocab().items()
             if token.startswith("Ġ") and token[1:].isalpha() and len(token) > 2]  # fmt: skip
    assert len(words) > 10
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        keep = torch.zeros(len(head), dtype=torch.bool)
        keep[words] = True
        head[~keep] = 0.0
        head[keep] *= 20.0  # some word always beats the zeroed logits
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    return build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (starting one costs seconds)."""
    import ray

    from featurewatch.actors.runtime import quiet_ray_logs, start_local_ray

    quiet_ray_logs()
    start_local_ray(num_cpus=2, object_store_memory_mb=512)
    yield
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """A local S3-compatible endpoint (moto's server, a real HTTP S3 API)."""

    bucket = "featurewatch-test"

    def __init__(self, port: int):
        self.port = port
        self.endpoint = f"127.0.0.1:{port}"

    def uri(self, name: str = "lake") -> str:
        """A fresh prefix in the bucket, as a pyarrow filesystem URI."""
        prefix = f"{name}-{uuid.uuid4().hex[:8]}"
        return (
            f"s3://{self.bucket}/{prefix}?endpoint_override={self.endpoint}"
            "&scheme=http&region=us-east-1"
        )


@pytest.fixture(scope="session")
def s3_server():
    import pyarrow.fs as pafs

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Any credentials do for moto; pyarrow in this process (the lake writer, the catalog,
    # the SAE store) and the child processes the tests start read these.
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = "featurewatch"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "featurewatch-secret"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the local S3 server (moto) did not start") from None
                time.sleep(0.2)
        server = S3Server(port)
        fs = pafs.S3FileSystem(
            endpoint_override=server.endpoint,
            scheme="http",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        fs.create_dir(server.bucket)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def mount_small_disk(folder, megabytes: int) -> None:
    """A real filesystem of `megabytes` MiB at `folder` (tmpfs: root only, as on CI)."""
    os.makedirs(folder, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)],
        check=True,
        capture_output=True,
    )


def fill_disk(folder) -> int:
    """Write `folder/filler` until the filesystem is full; the bytes written."""
    written = 0
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):  # then the last partial chunk's room too
            with contextlib.suppress(OSError):
                while n := f.write(b"\0" * size):
                    written += n
    return written


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB filesystem of its own (tmpfs), unmounted after the test."""
    folder = tmp_path / "small-disk"
    mount_small_disk(folder, 8)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def disk_fault(monkeypatch):
    """`disk_fault("fdatasync")` makes the spool's next `os.fdatasync` call fail with
    EIO, once (any `os` function the spool calls: pwritev, replace...)."""
    from featurewatch.storage import spool as spool_module

    armed: set[str] = set()

    def arm(name: str) -> None:
        real = getattr(spool_module.os, name)
        if not getattr(real, "is_disk_fault", False):

            def flaky(*args):
                if name in armed:
                    armed.discard(name)
                    raise OSError(5, "Input/output error")
                return real(*args)

            flaky.is_disk_fault = True
            monkeypatch.setattr(spool_module.os, name, flaky)
        armed.add(name)

    return arm
