"""The transformer side: load any Hugging Face causal LM, read its residual stream, splice into it.

Residual activations are the outputs of the decoder blocks (the embedding output is excluded and
the last block's output is taken before the final norm), captured with forward hooks. Hooks rather
than hand-run blocks keep this independent of each architecture's internals (rotary embeddings,
attention masks, cache objects), which change between transformers releases.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from mlsae import fetch
from mlsae.precision import resolve as resolve_precision
from mlsae.utils import MLSAEError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Where the decoder blocks live in common families (checked before the generic search).
_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen, Gemma, Phi-3, SmolLM
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "transformer.h",  # GPT-2, GPT-J, Bloom, Falcon
    "model.decoder.layers",  # OPT
    "transformer.layers",
    "transformer.blocks",
    "model.language_model.layers",  # multimodal wrappers
)
# Names of the final norm, looked up on the module that holds the block list.
_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "norm_f", "final_layernorm", "final_norm")

Edit = Callable[[Tensor], Tensor]


class _StopForward(Exception):
    """Raised from a hook to end the forward pass once the deepest requested block has run."""


# --------------------------------------------------------------------------------------------
# Loading


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _looks_like_path(name: str) -> bool:
    """A hub id is ``owner/name`` (or a bare name); anything else path-like is meant as a path."""
    if name.startswith(("/", ".", "~")) or "\\" in name:
        return True
    return name.count("/") > 1


def _gguf_source(path: Path, name: str) -> tuple[str, dict]:
    if not path.is_file():
        raise MLSAEError(f"cannot load model {name!r}: no such GGUF file {str(path)!r}")
    return str(path.parent), {"gguf_file": path.name}


def _local_source(name: str) -> tuple[str, dict] | None:
    """(directory, extra from_pretrained kwargs) for a local model, None for a hub id."""
    embedded = fetch.embedded_model_dir(name)
    if embedded is not None:
        embedded = Path(embedded)
        if embedded.suffix.lower() == ".gguf":
            return _gguf_source(embedded, name)
        return str(embedded), {}
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf"):
        return _gguf_source(path, name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path), {}
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_source(ggufs[0], name)
        raise MLSAEError(f"cannot load model {name!r}: the directory has no config.json (nor a single .gguf file)")
    if path.exists():
        raise MLSAEError(f"cannot load model {name!r}: not a model directory or a .gguf file")
    if _looks_like_path(name):
        raise MLSAEError(f"cannot load model {name!r}: no such file or directory")
    return None


def load_tokenizer(name: str):
    """The tokenizer alone of ``name`` (the embedded default, a folder, a .gguf or a hub id)."""
    from transformers import AutoTokenizer

    try:
        local = _local_source(name)
        if local is None:
            return AutoTokenizer.from_pretrained(name)
        source, kwargs = local
        return AutoTokenizer.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        raise MLSAEError(f"cannot load the tokenizer of {name!r}: {e}") from e


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    if flag.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    with contextlib.suppress(ImportError, AttributeError):
        import huggingface_hub.constants as hub_constants

        return bool(hub_constants.HF_HUB_OFFLINE)
    return False


def _hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub endpoint cannot be reached, or None if a TCP connection opens.

    This avoids huggingface_hub's minute-long retry loop when a machine has no network. With a
    proxy configured, a direct connection says nothing, so the check is skipped.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    try:
        from huggingface_hub.constants import ENDPOINT
    except ImportError:
        return "huggingface_hub is not installed"
    url = urlparse(ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        return f"{type(e).__name__}: {e}"
    return None


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers renamed ``torch_dtype`` to ``dtype`` in 4.56."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _from_pretrained(source: str, dtype: torch.dtype, trust_remote_code: bool, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        source, trust_remote_code=trust_remote_code, **_dtype_kwarg(dtype), **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    return model, tokenizer


_LOAD_ERRORS = (OSError, ValueError, KeyError, ImportError, RuntimeError)


def _load_from_hub(name: str, dtype: torch.dtype, trust_remote_code: bool):
    """Use the local Hub cache first; go online only if the Hub can actually be reached."""
    try:
        return _from_pretrained(name, dtype, trust_remote_code, local_files_only=True)
    except _LOAD_ERRORS:
        pass
    hint = f"; the embedded copy is {fetch.DEFAULT_MODEL!r}" if name.lower() == fetch.HUB_ID.lower() else ""
    if _hub_offline():
        raise MLSAEError(f"cannot load model {name!r}: not a local path, not in the Hugging Face cache, "
                         f"and offline mode is on{hint}")
    reason = _hub_unreachable_reason()
    if reason is not None:
        raise MLSAEError(f"cannot load model {name!r}: not a local path and the Hugging Face Hub is "
                         f"unreachable ({reason}){hint}")
    try:
        return _from_pretrained(name, dtype, trust_remote_code)
    except _LOAD_ERRORS as e:
        raise MLSAEError(f"cannot load model {name!r} from the Hugging Face Hub: {_first_line(e)}") from e


def load_transformer(
    name: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a hub id, a local directory or a ``.gguf`` file.

    The embedded default model resolves to its locally fetched copy. The model comes back in eval
    mode with gradients off (we only read and splice activations). Any failure is an
    ``MLSAEError`` with one line saying why, so CLIs and notebooks can show it as is.
    """
    name = str(name)
    local = _local_source(name)
    if local is None:
        model, tokenizer = _load_from_hub(name, dtype, trust_remote_code)
    else:
        source, kwargs = local
        try:
            model, tokenizer = _from_pretrained(source, dtype, trust_remote_code, local_files_only=True, **kwargs)
        except _LOAD_ERRORS as e:
            raise MLSAEError(f"cannot load model {name!r}: {_first_line(e)}") from e
    try:
        model.to(device)
    except (RuntimeError, AssertionError, ValueError) as e:
        raise MLSAEError(f"cannot move model {name!r} to device {str(device)!r}: {_first_line(e)}") from e
    model.eval().requires_grad_(False)
    model.config._name_or_path = name  # what the user asked for, not the resolved cache path
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs one; EOS is already special
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# Locating the parts of a model


def _module_at(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _find_blocks(model: nn.Module) -> str:
    """Dotted path of the decoder block list: a known location, else the longest ModuleList."""
    for path in _BLOCK_PATHS:
        if isinstance(_module_at(model, path), nn.ModuleList):
            return path
    n_layers = getattr(model.config, "num_hidden_layers", None) if hasattr(model, "config") else None
    candidates = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not candidates:
        raise MLSAEError(f"cannot find the decoder blocks of {type(model).__name__}")
    # Prefer a list as long as the config's layer count, then the longest, then the shallowest.
    name, _ = max(candidates, key=lambda c: (len(c[1]) == n_layers, len(c[1]), -c[0].count(".")))
    return name


def _find_final_norm(model: nn.Module, blocks_path: str) -> str | None:
    """Dotted path of the final norm, a sibling of the block list (None if the model has none)."""
    parent_path = blocks_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    prefix = f"{parent_path}." if parent_path else ""
    for name in _NORM_NAMES:
        if isinstance(getattr(parent, name, None), nn.Module):
            return prefix + name
    norms = [n for n, m in parent.named_children() if "norm" in type(m).__name__.lower()]
    return prefix + norms[-1] if norms else None


def _hidden(output) -> Tensor:
    """The hidden state in a block's output (a tensor, or the first item of a tuple)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"unexpected decoder block output of type {type(output).__name__}")


def _with_hidden(output, hidden: Tensor):
    """``output`` with its hidden state replaced, in the same form the block returned."""
    if isinstance(output, Tensor):
        return hidden
    return type(output)((hidden, *output[1:]))


class _Constant(nn.Module):
    """Stands in for a skipped block: returns a fixed hidden state in the block's output form.

    Attribute lookups fall through to the real block, because some models read per-layer
    attributes (e.g. ``attention_type``) from the block objects while looping over them.
    """

    def __init__(self, block: nn.Module, hidden: Tensor, tuple_len: int | None):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: keeps state_dict clean
        self._hidden_value = hidden
        self._tuple_len = tuple_len

    def forward(self, *args, **kwargs):
        if self._tuple_len is None:
            return self._hidden_value
        return (self._hidden_value,) + (None,) * (self._tuple_len - 1)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


# --------------------------------------------------------------------------------------------
# The wrapper


class Transformer(nn.Module):
    """A causal LM seen as a stack of decoder blocks: read any block's output, or replace it.

    An ``nn.Module`` so that ``.to()`` and ``state_dict()`` work (the wrapped model is
    ``self.model``); the block list, final norm and LM head are looked up by path, not
    registered twice.
    """

    def __init__(self, model: nn.Module, tokenizer=None, name: str | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        config = getattr(model, "config", None)
        self.name = name or getattr(config, "_name_or_path", None) or type(model).__name__
        self._blocks_path = _find_blocks(model)
        self._norm_path = _find_final_norm(model, self._blocks_path)
        if getattr(model, "get_output_embeddings", lambda: None)() is None:
            raise MLSAEError(f"{type(model).__name__} has no LM head (is it a causal LM?)")
        self.n_layers = len(self.blocks)
        self.d_model = self._infer_d_model()
        self.vocab_size = self._infer_vocab_size()
        self.special_ids: list[int] = sorted(set(tokenizer.all_special_ids)) if tokenizer is not None else []
        params = inspect.signature(model.forward).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        self._accepts_position_ids = "position_ids" in params
        self._accepts_use_cache = "use_cache" in params or takes_any
        self._block_form: tuple[bool, int] | None = None  # (returns a tuple, its length), seen in a forward
        self._skip_prefix_ok: bool | None = None  # None until checked against the hook path once

    @classmethod
    def from_pretrained(cls, name: str | os.PathLike, **kwargs) -> Transformer:
        """``Transformer(*load_transformer(name, **kwargs))``."""
        model, tokenizer = load_transformer(name, **kwargs)
        return cls(model, tokenizer, name=str(name))

    # -- parts and sizes ------------------------------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_submodule(self._blocks_path)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_submodule(self._norm_path) if self._norm_path else nn.Identity()

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    def _infer_d_model(self) -> int:
        config = getattr(self.model, "config", None)
        for key in ("hidden_size", "n_embd", "d_model"):
            if isinstance(getattr(config, key, None), int):
                return getattr(config, key)
        return self.model.get_input_embeddings().weight.shape[-1]

    def _infer_vocab_size(self) -> int:
        weight = getattr(self.lm_head, "weight", None)
        if weight is not None:
            return weight.shape[0]
        return self.model.config.vocab_size

    def extra_repr(self) -> str:
        return f"name={self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, vocab_size={self.vocab_size}"

    # -- inputs ---------------------------------------------------------------------------------

    def special_mask(self, input_ids: Tensor) -> Tensor:
        """True where ``input_ids`` holds a special token (EOS, BOS, PAD, ...)."""
        special = torch.tensor(self.special_ids, dtype=input_ids.dtype, device=input_ids.device)
        return torch.isin(input_ids, special)

    def _check_layers(self, layers: Sequence[int] | int | None) -> list[int]:
        if layers is None:
            return list(range(self.n_layers))
        if isinstance(layers, int):
            layers = [layers]
        layers = [int(layer) for layer in layers]
        if not layers:
            raise MLSAEError("no layers requested")
        bad = [layer for layer in layers if not 0 <= layer < self.n_layers]
        if bad:
            raise MLSAEError(f"layer(s) {bad} out of range: {self.name} has layers 0..{self.n_layers - 1}")
        return layers

    def _forward_kwargs(self, input_ids: Tensor, attention_mask: Tensor | None) -> dict:
        """Model kwargs; with a mask, positions count only real tokens (so left padding works)."""
        kwargs: dict = {"input_ids": input_ids.to(self.device)}
        if self._accepts_use_cache:
            kwargs["use_cache"] = False  # a KV cache is wasted work here
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
            kwargs["attention_mask"] = attention_mask
            if self._accepts_position_ids:
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return kwargs

    # -- precision ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def weights_for(self, precision: str) -> Iterator[None]:
        """Hold the Linear layers' weights in bf16 while inside, where ``precision`` resolves to bf16.

        For a stretch of forwards under bf16 autocast (``mlsae.precision.autocast``): autocast casts
        every fp32 weight again at each forward (15% of a 256-token SmolLM2 forward on a 2-core CPU);
        holding the cast copies gives the same results bit for bit. Parameters shared with the input
        embedding (a tied LM head) stay fp32, as the embedding runs outside autocast. Inside, a
        forward without bf16 autocast fails on the dtypes; the fp32 weights are back on exit.
        """
        held = []
        if resolve_precision(precision, self.device) == "bf16":
            tied = {id(p) for p in self.model.get_input_embeddings().parameters()}
            for module in self.model.modules():
                if isinstance(module, nn.Linear):
                    for p in module.parameters(recurse=False):
                        if p.dtype == torch.float32 and id(p) not in tied:
                            held.append((p, p.data))
                            p.data = p.data.to(torch.bfloat16)
        try:
            yield
        finally:
            for p, data in held:
                p.data = data

    # -- hooks ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _hooks(self, hooks: dict[int, Callable], modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
        """Register forward hooks on blocks and always remove them, even on errors."""
        modules = self.blocks if modules is None else modules
        handles = []
        try:
            for layer, hook in hooks.items():
                handles.append(modules[layer].register_forward_hook(hook))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _note_form(self, output) -> None:
        if self._block_form is None:
            is_tuple = not isinstance(output, Tensor)
            self._block_form = (is_tuple, len(output) if is_tuple else 1)

    def _capture_hooks(self, layers: list[int], stop: bool) -> tuple[dict[int, Callable], dict]:
        """Hooks copying block outputs into one [L, B, P, d] buffer (slot i holds ``layers[i]``)."""
        slots: dict[int, list[int]] = {}
        for i, layer in enumerate(layers):
            slots.setdefault(layer, []).append(i)
        deepest = max(layers)
        state: dict = {"out": None}

        def make(layer: int) -> Callable:
            def hook(module, args, output):
                self._note_form(output)
                hidden = _hidden(output)
                if state["out"] is None:
                    state["out"] = hidden.new_empty((len(layers), *hidden.shape))
                for i in slots[layer]:
                    state["out"][i].copy_(hidden)  # a copy: later in-place ops cannot alter it
                if stop and layer == deepest:
                    raise _StopForward

            return hook

        return {layer: make(layer) for layer in slots}, state

    # -- reading --------------------------------------------------------------------------------

    @torch.no_grad()
    def residuals(
        self, input_ids: Tensor, layers: Sequence[int] | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Block outputs ``[L, B, P, d]`` for ``layers`` (default all), in the order given.

        The forward pass stops right after the deepest requested block, so later blocks and
        the LM head never run. The dtype is whatever the model produced (e.g. under autocast).
        """
        layers = self._check_layers(layers)
        hooks, state = self._capture_hooks(layers, stop=True)
        with self._hooks(hooks):
            try:
                self.model(**self._forward_kwargs(input_ids, attention_mask))
            except _StopForward:
                pass
        if state["out"] is None:
            raise RuntimeError(f"the forward pass of {self.name} never ran the requested blocks")
        return state["out"]

    def forward(
        self, input_ids: Tensor, layers: Sequence[int] | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        return self.residuals(input_ids, layers, attention_mask)

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Clean logits ``[B, P, V]``."""
        return self.model(**self._forward_kwargs(input_ids, attention_mask)).logits

    @torch.no_grad()
    def run_with_residuals(
        self, input_ids: Tensor, layers: Sequence[int] | None = None, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Residuals ``[L, B, P, d]`` and clean logits ``[B, P, V]`` from one forward pass."""
        layers = self._check_layers(layers)
        hooks, state = self._capture_hooks(layers, stop=False)
        with self._hooks(hooks):
            logits = self.model(**self._forward_kwargs(input_ids, attention_mask)).logits
        return state["out"], logits

    # -- splicing -------------------------------------------------------------------------------

    @torch.no_grad()
    def logits_with_edit(
        self, input_ids: Tensor, layer: int, fn: Edit, attention_mask: Tensor | None = None
    ) -> Tensor:
        """Logits when block ``layer``'s output ``h [B, P, d]`` is replaced by ``fn(h)``.

        General enough for splicing a reconstruction, ablating, or steering (adding a direction).
        """
        (layer,) = self._check_layers([layer])

        def hook(module, args, output):
            self._note_form(output)
            hidden = _hidden(output)
            edited = fn(hidden)
            if edited.shape != hidden.shape:
                raise ValueError(f"edit returned shape {tuple(edited.shape)}, expected {tuple(hidden.shape)}")
            return _with_hidden(output, edited.to(device=hidden.device, dtype=hidden.dtype))

        with self._hooks({layer: hook}):
            return self.model(**self._forward_kwargs(input_ids, attention_mask)).logits

    @torch.no_grad()
    def logits_with_replacement(
        self,
        input_ids: Tensor,
        layer: int,
        replacement: Tensor,
        attention_mask: Tensor | None = None,
        *,
        skip_prefix: bool = True,
    ) -> Tensor:
        """Logits when block ``layer``'s output is replaced by ``replacement [B, P, d]``.

        With ``skip_prefix`` the blocks up to ``layer`` are not computed at all (their result
        would be thrown away), which halves the cost of splicing every layer in turn. The first
        such call is checked against the plain hook path and the shortcut is dropped for good
        if the two disagree (a model whose blocks share state across layers). The swap mutates
        the model for the duration of the call: do not share one model between threads.
        """
        (layer,) = self._check_layers([layer])
        expected = (*input_ids.shape, self.d_model)
        if tuple(replacement.shape) != expected:
            raise ValueError(f"replacement has shape {tuple(replacement.shape)}, expected {expected}")
        by_hook = lambda: self.logits_with_edit(input_ids, layer, lambda h: replacement, attention_mask)  # noqa: E731
        if skip_prefix and self._skip_prefix_ok:
            return self._logits_skipping_prefix(input_ids, layer, replacement, attention_mask)
        slow = by_hook()  # user errors surface here, from the plain path
        if skip_prefix and self._skip_prefix_ok is None and self._block_form is not None:
            self._skip_prefix_ok = self._shortcut_agrees(slow, input_ids, layer, replacement, attention_mask)
        return slow

    def _shortcut_agrees(
        self, slow: Tensor, input_ids: Tensor, layer: int, replacement: Tensor, attention_mask: Tensor | None
    ) -> bool:
        """Whether skipping the prefix reproduces the hook path on this model (checked once)."""
        try:
            fast = self._logits_skipping_prefix(input_ids, layer, replacement, attention_mask)
        except Exception:  # noqa: BLE001 - any failure just means: do not take the shortcut
            return False
        scale = slow.detach().abs().max().clamp(min=1.0).item()
        return bool(torch.allclose(fast.float(), slow.float(), rtol=1e-3, atol=1e-4 * scale))

    def _logits_skipping_prefix(
        self, input_ids: Tensor, layer: int, replacement: Tensor, attention_mask: Tensor | None
    ) -> Tensor:
        """Swap blocks 0..layer for constants returning ``replacement``, run, and swap them back.

        A hook on the real block ``layer`` also splices, so the result is right even if a model
        does not call its blocks through the list.
        """
        blocks = self.blocks
        is_tuple, length = self._block_form
        hidden = replacement.to(device=self.device, dtype=self.dtype)
        originals = [blocks[i] for i in range(layer + 1)]

        def hook(module, args, output):
            return _with_hidden(output, hidden)

        try:
            for i, block in enumerate(originals):
                blocks[i] = _Constant(block, hidden, length if is_tuple else None)
            with self._hooks({layer: hook}, modules=originals):
                return self.model(**self._forward_kwargs(input_ids, attention_mask)).logits
        finally:
            for i, block in enumerate(originals):
                blocks[i] = block


def transformer_for(sae, model_name: str | None, device: torch.device, source: str) -> Transformer:
    """The transformer an MLSAE reads: ``model_name``, else the one its config names; its width
    is checked against the MLSAE's (``source`` names the MLSAE in errors)."""
    name = model_name or sae.config.model_name
    if name is None:
        raise MLSAEError(f"{source} does not name its transformer: pass --model_name")
    transformer = Transformer(*load_transformer(name, device=device))
    if transformer.d_model != sae.config.n_inputs:
        raise MLSAEError(f"{name} has d_model {transformer.d_model}, the MLSAE expects {sae.config.n_inputs}")
    return transformer
