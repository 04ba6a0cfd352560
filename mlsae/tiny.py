"""Tiny random-weight causal LMs with a real tokenizer, for the tests and the ``smoke`` profile.

They exercise the same code paths as a real model (Hugging Face ``from_pretrained``, decoder
blocks, final norm, LM head, byte-level BPE) in milliseconds, and need no download.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mlsae.utils import MLSAEError, atomic_path, cache_dir, quiet_hf_progress, run_cli

if TYPE_CHECKING:
    import numpy as np

ARCHS = ("llama", "gpt_neox", "gpt2")
EOS = "<|endoftext|>"
BOS = "<s>"  # only in the tokenizer variant that adds BOS (see _train_tokenizer)
VOCAB_SIZE = 512
MAX_POSITIONS = 512
_MARKER = "mlsae-tiny.json"

# A small built-in English text to train the BPE merges on; any text still tokenizes (byte level).
_TEXT = """\
The quick brown fox jumps over the lazy dog. A stitch in time saves nine, and the early bird
catches the worm. It was the best of times, it was the worst of times; it was the age of wisdom,
it was the age of foolishness. Call me Ishmael. Some years ago, never mind how long precisely,
having little or no money in my purse, and nothing particular to interest me on shore, I thought
I would sail about a little and see the watery part of the world.
In the beginning the village had one road, one well and one school. The children walked to the
river every morning, and the teacher told them stories about the mountains, the sea and the
stars. They learned to read and to write, to count to one hundred, and to ask good questions.
Scientists study the structure of language models by looking at the residual stream: the vector
that every layer reads from and writes to. A sparse autoencoder learns a dictionary of features,
so that each activation is the sum of a few directions. Researchers train it on many tokens, then
they evaluate how well it reconstructs the activations and how much the loss of the model changes.
"Where are you going?" she asked. "To the market," he said, "to buy bread, cheese and apples."
The weather was cold in January and warm in July. On Monday, Tuesday and Wednesday it rained;
on Thursday the sun came out, and by Friday the streets were dry again. Numbers such as 1, 2, 3,
10, 42, 100, 2024 and 3.14159 appear in the text too, as do dates like 12 March 1999.
The government announced a new policy for schools, hospitals and roads. The committee met in the
afternoon and discussed the budget for the next year. Members of the public were invited to send
their comments before the end of the month. The report was long, but the summary was clear.
She opened the door, looked at the garden and smiled. The flowers were red, yellow and blue, and
the trees were green. Birds sang in the morning, and at night the house was quiet and dark.
What is the capital of France? Paris is the capital of France. What is two plus two? It is four.
"""


def _train_tokenizer(bos: bool = False):
    """Train a byte-level BPE on the built-in text so that any unicode string tokenizes.

    By default one token is BOS, EOS and padding, and encodings get no special tokens (as GPT-2 and
    Pythia). ``bos=True`` adds a separate ``<s>`` BOS (id ``VOCAB_SIZE``) that every encoding starts
    with (as Llama-2 and Gemma), to test the handling of such tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TEXT.splitlines(), trainer=trainer)
    special = dict(bos_token=BOS, add_bos_token=True) if bos else dict(bos_token=EOS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=MAX_POSITIONS,
        **special,
    )


def _config(arch: str, vocab_size: int, eos_id: int, n_layers: int, d_model: int, bos_id: int | None = None):
    """A small config for ``arch``; 4 heads, MLP 4x wide, weights scaled up so layers differ visibly."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    ids = dict(bos_token_id=eos_id if bos_id is None else bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=2 * d_model,
            num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False,
            initializer_range=0.1, **ids,
        )
    if arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=d_model, intermediate_size=4 * d_model,
            num_hidden_layers=n_layers, num_attention_heads=4, max_position_embeddings=MAX_POSITIONS,
            use_parallel_residual=True, initializer_range=0.1, **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=d_model, n_layer=n_layers, n_head=4,
            n_positions=MAX_POSITIONS, initializer_range=0.1, **ids,
        )
    raise MLSAEError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def default_path(arch: str, n_layers: int = 2, d_model: int = 64, seed: int = 0) -> Path:
    """``<cache>/models/tiny-{arch}-{n_layers}l``, with suffixes only for non-default sizes or seeds."""
    name = f"tiny-{arch}-{n_layers}l"
    if d_model != 64:
        name += f"-d{d_model}"
    if seed != 0:
        name += f"-s{seed}"
    return cache_dir() / "models" / name


def _check_existing(path: Path, spec: dict) -> Path:
    """Reuse a finished model only if it was built from the same spec (never silently another one)."""
    marker = path / _MARKER
    found = json.loads(marker.read_text()) if marker.exists() else None
    if found != spec:
        raise MLSAEError(f"{path} already holds a different model ({found}); remove it or choose another path")
    return path


def make_tiny(
    arch: str = "llama",
    path: str | os.PathLike | None = None,
    *,
    n_layers: int = 2,
    d_model: int = 64,
    seed: int = 0,
    bos: bool = False,
) -> Path:
    """Build (or reuse) a tiny random causal LM of family ``arch`` and return its directory.

    ``bos=True`` gives it a tokenizer that starts every encoding with its own BOS (as Llama-2 and
    Gemma). Deterministic given ``seed``; written atomically (temp dir + rename), so concurrent callers
    and interrupted runs never leave a half-written model behind.
    """
    if arch not in ARCHS:
        raise MLSAEError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if d_model % 4:
        raise MLSAEError(f"d_model must be a multiple of 4 (4 heads), got {d_model}")
    path = Path(path) if path is not None else default_path(arch, n_layers, d_model, seed)
    spec = {"arch": arch, "n_layers": n_layers, "d_model": d_model, "seed": seed} | ({"bos": True} if bos else {})
    if (path / _MARKER).exists() or (path.exists() and any(path.iterdir())):
        return _check_existing(path, spec)

    from transformers import AutoModelForCausalLM

    tokenizer = _train_tokenizer(bos)
    config = _config(arch, len(tokenizer), tokenizer.eos_token_id, n_layers, d_model,
                     tokenizer.bos_token_id if bos else None)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is an ordinary shared cache entry
        with quiet_hf_progress():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps(spec))
        with contextlib.suppress(FileNotFoundError):
            path.rmdir()  # an empty placeholder directory may be replaced
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / _MARKER).exists():  # a concurrent builder won the race: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _check_existing(path, spec)


def _llama_cpp_permute(weight, n_heads: int):
    """llama.cpp's row order for Q/K (rotary pairs interleaved); transformers undoes it on load."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _gguf_tensors(model, config) -> Iterator[tuple[str, "np.ndarray"]]:
    """(GGUF name, float32 array) for every weight of a Llama model, as llama.cpp names them."""
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    yield "token_embd.weight", sd["model.embed_tokens.weight"]
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        yield b + "attn_norm.weight", sd[p + "input_layernorm.weight"]
        yield b + "attn_q.weight", _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], config.num_attention_heads)
        yield b + "attn_k.weight", _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], config.num_key_value_heads)
        yield b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"]
        yield b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"]
        yield b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"]
        yield b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"]
        yield b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"]
        yield b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"]
    yield "output_norm.weight", sd["model.norm.weight"]
    yield "output.weight", sd["lm_head.weight"]


def _write_gguf(model_dir: Path, out: Path, qtype: str) -> None:
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = sorted(state["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    special = set(tokenizer.all_special_ids)

    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if i in special else 1 for _, i in vocab])  # 3 CONTROL, 1 NORMAL
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    quant = gguf.GGMLQuantizationType[qtype]
    for name, array in _gguf_tensors(model, config):
        if array.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:  # norms stay float, as llama.cpp does
            writer.add_tensor(name, gguf.quants.quantize(array, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_tiny_gguf(
    path: str | os.PathLike | None = None,
    *,
    qtype: str = "F32",
    n_layers: int = 2,
    d_model: int = 64,
    seed: int = 0,
) -> Path:
    """Write the tiny Llama as a single ``.gguf`` file (``qtype`` F32, Q8_0 or Q4_1), like the embedded default.

    Lets the tests and the ``smoke`` profile exercise the GGUF loading path (metadata config,
    byte-level tokenizer, Q/K un-permuting, dequantization) without the 98 MB real file.
    """
    if qtype not in ("F32", "Q8_0", "Q4_1"):
        raise MLSAEError(f"unsupported GGUF type {qtype!r}; choose F32, Q8_0 or Q4_1")
    sizes = dict(n_layers=n_layers, d_model=d_model, seed=seed)
    if path is None:
        model_dir = make_tiny("llama", **sizes)
        path = model_dir.with_name(f"{model_dir.name}-{qtype.lower()}.gguf")
    else:
        path = Path(path)
        model_dir = None
    if path.is_file():
        return path
    if model_dir is None:  # the float source model lives beside the file
        model_dir = make_tiny("llama", path.with_name(path.stem + "-hf"), **sizes)
    with atomic_path(path) as tmp, quiet_hf_progress():
        _write_gguf(model_dir, tmp, qtype)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlsae.tiny", description=make_tiny.__doc__)
    parser.add_argument("--arch", choices=ARCHS, default="llama")
    parser.add_argument("--path", default=None, help="output directory (default: the cache)")
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gguf", metavar="QTYPE", choices=("F32", "Q8_0", "Q4_1"), default=None,
                        help="write the tiny Llama as one .gguf file of this type instead")
    args = parser.parse_args(argv)
    sizes = dict(n_layers=args.n_layers, d_model=args.d_model, seed=args.seed)
    if args.gguf:
        if args.arch != "llama":
            raise MLSAEError("--gguf is only supported for --arch llama")
        print(make_tiny_gguf(args.path, qtype=args.gguf, **sizes))
    else:
        print(make_tiny(args.arch, args.path, **sizes))


if __name__ == "__main__":
    run_cli(main)
