"""Optional native CPU kernels (mlsae/csrc/sparse_kernels.c), compiled on first use.

PyTorch's CPU ``topk`` costs about 2 ns per pre-activation, as much as the bf16 encoder
product itself, and its sparse products sort and allocate; these few C loops do the sparse
parts of a TopK step at memory speed. They are built with the system C compiler
(``cc -O3 -march=native -fopenmp``) into a per-machine cache and loaded with ctypes, so no
build step or extra package is needed. Every call goes through ``Kernel``, which reads the
function's prototype from the C source and checks each tensor's dtype, device and layout
against it (a TypeError, not a crash, on a mismatch); the wrappers below derive the sizes they
pass from the tensors themselves. Without a compiler, or with ``MLSAE_NATIVE=0``,
``lib()`` returns None and mlsae.kernels uses its pure PyTorch path (same results).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mlsae.utils import cache_dir

SOURCE = Path(__file__).parent / "csrc" / "sparse_kernels.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

# The C types of the kernels' parameters: what a tensor passed for a pointer must hold.
POINTEE = {"float": (torch.float32,), "int64_t": (torch.int64,), "uint16_t": (torch.bfloat16,),
           "uint8_t": (torch.uint8,), "int32_t": (torch.int32,), "void": (torch.float32, torch.bfloat16)}
SCALARS = {"float": ctypes.c_float, "int": ctypes.c_int, "int64_t": ctypes.c_int64}
RETURNS = {"void": None, "int64_t": ctypes.c_int64}


@dataclass(frozen=True)
class Param:
    name: str
    ctype: str  # without const
    pointer: bool


def prototypes(source: str) -> dict[str, tuple[list[Param], str]]:
    """Every exported ``mlsae_*`` function of the C source: its parameters and return type, read
    from the source itself, so that the Python side has no hand-kept table to fall out of step."""
    out = {}
    for ret, name, args in re.findall(r"^(void|int64_t)\s+(mlsae_\w+)\(([^)]*)\)", source, re.M):
        params = []
        for arg in args.split(","):
            m = re.fullmatch(r"(\w+)\s*(\*?)\s*(\w+)", " ".join(arg.replace("const", " ").split()))
            if m is None:
                raise RuntimeError(f"cannot read the parameter {arg.strip()!r} of {name}")
            params.append(Param(m[3], m[1], bool(m[2])))
        out[name] = (params, ret)
    return out


class Kernel:
    """One C function behind a checked call: tensors for pointers (dtype, CPU, layout checked
    against the prototype, a TypeError on a mismatch instead of a crash), numbers for scalars."""

    def __init__(self, fn, name: str, params: list[Param], ret: str):
        self.name, self.params = name, params
        fn.argtypes = [ctypes.c_void_p if p.pointer else SCALARS[p.ctype] for p in params]
        fn.restype = RETURNS[ret]
        self.fn = fn

    def __call__(self, *args):
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        return self.fn(*(self._arg(p, a) for p, a in zip(self.params, args)))

    def _arg(self, p: Param, a):
        if not p.pointer:
            return a
        if a is None:
            return None
        if not isinstance(a, Tensor) or a.device.type != "cpu":
            raise TypeError(f"{self.name}({p.name}): expected a CPU tensor, got {type(a).__name__}")
        if a.dtype not in POINTEE[p.ctype]:
            raise TypeError(f"{self.name}({p.name}): expected {' or '.join(map(str, POINTEE[p.ctype]))}, got {a.dtype}")
        # "tile" is read with its own row stride; everything else must be one dense block
        if not (a.stride(-1) == 1 if p.name == "tile" else a.is_contiguous()):
            raise TypeError(f"{self.name}({p.name}): expected a contiguous tensor")
        return a.data_ptr()


class Library:
    """The loaded kernels, by name (``lib().mlsae_topk_block(...)``)."""

    def __init__(self, handle: ctypes.CDLL, source: str):
        self.kernels = {name: Kernel(getattr(handle, name), name, params, ret)
                        for name, (params, ret) in prototypes(source).items()}

    def __getattr__(self, name: str) -> Kernel:
        try:
            return self.kernels[name]
        except KeyError:
            raise AttributeError(name) from None


def enabled() -> bool:
    return os.environ.get("MLSAE_NATIVE", "1") != "0"


@functools.cache
def lib() -> Library | None:
    """The compiled kernels, or None (disabled, not x86/ARM Linux/macOS, or no working compiler)."""
    if not enabled() or not SOURCE.is_file():
        return None
    try:
        handle = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        warnings.warn(f"mlsae: native CPU kernels unavailable, using PyTorch ops ({e})", stacklevel=2)
        return None
    return Library(handle, SOURCE.read_text())


def _build() -> Path:
    """Compile into a cache folder keyed by source, flags, compiler and CPU (``-march=native``)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), cc.encode(), _cpu_id()])).hexdigest()[:16]
    folder = cache_dir() / "native" / key
    target = folder / "mlsae_native.so"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)  # concurrent builds (torchrun ranks) each rename
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{cc} failed: {e.stderr.decode(errors='replace')[-500:]}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _cpu_id() -> bytes:
    """What ``-march=native`` depends on: the CPU's feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return (platform.machine() + flags).encode()


def tune_malloc() -> bool:
    """Serve large allocations from glibc's heap and keep freed memory: returns whether it applied.

    By default every tensor over a few MB is a fresh mmap, and on a VM its first touch costs
    ~0.5-1 ms per MB in page faults: a training step that allocates a few hundred MB of
    gradients and temporaries spends more time faulting pages than computing. Process-wide
    (call it once, early, in a training process); peak RSS is unchanged, it just is not given back.
    """
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


def _threads() -> int:
    return torch.get_num_threads()


def usable(*tensors: Tensor) -> bool:
    """Whether the native kernels apply: loaded, and every tensor a contiguous CPU tensor."""
    return lib() is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def topk_rows(pre: Tensor, k: int) -> tuple[Tensor, Tensor] | None:
    """ReLU of the k largest values of each row of ``pre [n, F]`` (fp32 or bf16) and their columns.

    None when a row holds NaN (PyTorch's topk then decides what to do with it).
    """
    state = TopKState(pre.shape[0], k)
    return None if state.add(pre, 0) else state.finish()


class TopKState:
    """Running TopK of n rows over blocks of columns (each block folded in while it is in cache).

    Per row, 2k slots: the current k largest, then up to k pending candidates above the
    threshold (folded in when full, so selects stay rare even over many blocks).
    """

    def __init__(self, n: int, k: int):
        self.k = k
        self.values = torch.empty(n, 2 * k, dtype=torch.float32)
        self.indices = torch.empty(n, 2 * k, dtype=torch.int64)
        self.pending = torch.empty(n, dtype=torch.int64)
        self.threshold = torch.empty(n, dtype=torch.float32)

    def add(self, tile: Tensor, col0: int, rows: slice = slice(None)) -> int:
        """Fold columns ``col0 .. col0 + tile.shape[1]`` of ``rows`` (``tile [n_rows, cols]``, rows may be
        strided, fp32 or bf16). The first call of each row starts it (at least k columns). Returns
        how many rows held NaN."""
        n, cols = tile.shape
        k = self.k
        groups = max(2 * k, min(cols // 128, 16 * k))  # tighter threshold vs longer select: best on AVX-512
        first = col0 == 0
        return lib().mlsae_topk_block(
            tile, int(tile.dtype == torch.bfloat16), n, cols, tile.stride(0), col0, k, groups, int(first),
            self.values[rows], self.indices[rows], self.pending[rows], self.threshold[rows],
            _threads(),
        )

    def finish(self, relu: bool = True) -> tuple[Tensor, Tensor]:
        """Each row's k largest values [n, k] (ReLU'd) and their columns [n, k] (unordered)."""
        n, k = self.values.shape[0], self.k
        values = torch.empty(n, k, dtype=torch.float32)
        indices = torch.empty(n, k, dtype=torch.int64)
        lib().mlsae_topk_finish(self.values, self.indices, self.pending, n, k, int(relu),
                                values, indices, _threads())
        return values, indices


def rescore(values: Tensor, indices: Tensor, k: int, n_latents: int, row_err: Tensor, latent_err: Tensor,
            u: Tensor, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Exact fp32 TopK (ReLU'd values, indices) of ``u @ W.T`` from the K candidates of a bf16 or int8 product.

    ``values, indices [n, K]``: the K largest upper bounds of that product per row, each a
    low-precision score plus its error bound ``row_err[0, r] latent_err[0, f] + row_err[1, r] latent_err[1, f]``
    (``mlsae.kernels._encode_mixed``). Returns also a bool mask of the rows the candidates could
    not settle (to be computed by the caller).
    """
    n, K = values.shape
    out_v = torch.empty(n, k, dtype=torch.float32)
    out_i = torch.empty(n, k, dtype=torch.int64)
    flag = torch.empty(n, dtype=torch.uint8)
    lib().mlsae_rescore(values, indices, n, K, k, n_latents, row_err[0], row_err[1], latent_err[0], latent_err[1],
                        u, W, u.shape[1], out_v, out_i, flag, _threads())
    return out_v, out_i, flag.bool()


def int8_bounds(sums: Tensor, row_scale: Tensor, col_scale: Tensor, row_err: Tensor, col_err: Tensor, out: Tensor
                ) -> Tensor:
    """``out [n, cols]``: upper bounds of fp32 scores from the int32 sums of an int8 product, its scales
    and the error factors of ``rescore`` (``[2, n]`` and ``[2, cols]``)."""
    n, cols = sums.shape
    lib().mlsae_int8_bounds(sums, n, cols, row_scale, col_scale, row_err[0], row_err[1], col_err[0], col_err[1],
                            out, _threads())
    return out


class IndexSort:
    """A counting sort of one TopK's indices by latent (the order of its entries, latent by latent).

    The decoder's and the encoder's backward both scatter over the same indices; the decoder's,
    which runs first, sorts them and leaves the sort here for the encoder's. One is made per
    encode (``mlsae.kernels.topk_encode``) and travels with its ``TopK``; it is used once, and
    only for the very same indices (same memory, unchanged since).
    """

    def __init__(self) -> None:
        self.saved: tuple | None = None

    def keep(self, indices: Tensor, n_rows: int, rows: Tensor, entry: Tensor, start: Tensor) -> None:
        self.saved = (indices, indices._version, n_rows, rows, entry, start)

    def take(self, indices: Tensor, n_rows: int) -> tuple[Tensor, Tensor, Tensor] | None:
        saved, self.saved = self.saved, None
        if saved is None:
            return None
        kept, version, kept_rows, rows, entry, start = saved
        same = (kept.data_ptr() == indices.data_ptr() and kept.shape == indices.shape and kept.stride() == indices.stride()
                and kept._version == version == indices._version and kept_rows == n_rows)
        return (rows, entry, start) if same else None


def scatter_rows(w: Tensor, indices: Tensor, X: Tensor, n_rows: int, with_sum: bool = False,
                 shift: Tensor | None = None, sort: IndexSort | None = None) -> tuple[Tensor, Tensor | None]:
    """``out[f] = sum over (i, j) with indices[i, j] == f of w[i, j] * (X[i] - shift)``: [n_rows, d]
    (and the sums of w). X is fp32 or bf16. ``sort``: where a decode backward left its sort of
    these indices (used if it matches)."""
    n, k = indices.shape
    d = X.shape[1]
    out = torch.empty(n_rows, d, dtype=torch.float32)
    wsum = torch.empty(n_rows, dtype=torch.float32) if with_sum else None
    weights = torch.empty(n * k, dtype=torch.float32)
    buckets = sort.take(indices, n_rows) if sort is not None else None
    if buckets is None:
        rows, entry, start = torch.empty(n * k, dtype=torch.int64), None, torch.empty(n_rows + 1, dtype=torch.int64)
    else:
        rows, entry, start = buckets
    lib().mlsae_scatter_rows(
        w, indices, X, int(X.dtype == torch.bfloat16), shift,
        n, k, d, n_rows, out, wsum, rows, weights, start,
        entry, _threads(),
    )
    return out, wsum


def decode_backward(values: Tensor, indices: Tensor, grad_out: Tensor, W: Tensor, sort: IndexSort | None = None
                    ) -> tuple[Tensor, Tensor]:
    """Gradients of ``out[i] = sum_j values[i, j] * W[indices[i, j]]``: (dL/dW [F, d], dL/dvalues [n, k]).

    ``sort``: where to leave this pass's sort of ``indices`` for the encoder's scatter."""
    n, k = indices.shape
    n_rows, d = W.shape
    grad_W = torch.empty(n_rows, d, dtype=torch.float32)
    grad_v = torch.empty(n, k, dtype=torch.float32)
    rows, entry = torch.empty(2, n * k, dtype=torch.int64)
    weights = torch.empty(n * k, dtype=torch.float32)
    start = torch.empty(n_rows + 1, dtype=torch.int64)
    lib().mlsae_decode_backward(
        values, indices, grad_out, W, n, k, d, n_rows, grad_W, grad_v,
        rows, weights, entry, start, _threads(),
    )
    if sort is not None:
        sort.keep(indices, n_rows, rows, entry, start)
    return grad_W, grad_v


def decode(values: Tensor, indices: Tensor, W: Tensor, l2_bytes: int = 0) -> Tensor:
    """``out[i] = sum_j values[i, j] * W[indices[i, j]]`` [n, d] (fp32), j in order; by blocks of
    columns where a block of W fits in half of ``l2_bytes`` (0: this machine's L2)."""
    n, k = indices.shape
    out = torch.empty(n, W.shape[1], dtype=torch.float32)
    lib().mlsae_decode(values, indices, W, n, k, W.shape[1], W.shape[0], out, l2_bytes, _threads())
    return out


def gather_dot(indices: Tensor, W: Tensor, G: Tensor) -> Tensor:
    """``out[i, j] = <W[indices[i, j]], G[i]>``."""
    n, k = indices.shape
    out = torch.empty(n, k, dtype=torch.float32)
    lib().mlsae_gather_dot(indices, W, G, n, k, W.shape[1], out, _threads())
    return out


def project_rows(g: Tensor, w: Tensor) -> None:
    """In place: ``g[f] -= <g[f], w[f]> * w[f]`` for every row f."""
    lib().mlsae_project_rows(g, w, g.shape[0], g.shape[1], _threads())


def standardize(x: Tensor, eps: float, shift: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Per-row ``(z, mean, scale, sq_norm, low)`` of ``x [n, d]``: z = (x - mean) / (std + eps), in one
    pass; with ``shift [d]``, low = bf16(z - shift) (the encoder's input under bf16 autocast), else None."""
    n, d = x.shape
    z = torch.empty_like(x)
    mean, scale, sq_norm = torch.empty(3, n, 1)
    low = torch.empty(n, d, dtype=torch.bfloat16) if shift is not None else None
    lib().mlsae_standardize(x, n, d, eps, z, mean, scale, sq_norm,
                            shift, low,
                            _threads())
    return z, mean, scale, sq_norm, low


def scaled_error(decoded: Tensor, b: Tensor, z: Tensor, scale: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``err = (decoded + b - z) * scale`` [n, d], ``recon = x + err`` and each row's ``|err|^2`` [n]."""
    n, d = z.shape
    err = torch.empty_like(z)
    recon = torch.empty_like(z)
    sq = torch.empty(n)
    lib().mlsae_scaled_error(decoded, b, z, scale, x, n, d, err, recon,
                             sq, _threads())
    return err, recon, sq


def scaled_error_backward(err: Tensor, row_weight: Tensor) -> tuple[Tensor, Tensor]:
    """``grad = err * row_weight[:, None]`` and ``grad.sum(0)``."""
    n, d = err.shape
    threads = _threads()
    grad = torch.empty_like(err)
    grad_b = torch.empty(d)
    partial = torch.empty(threads, d)
    lib().mlsae_scaled_error_backward(err, row_weight, n, d, grad, grad_b, partial, threads)
    return grad, grad_b
