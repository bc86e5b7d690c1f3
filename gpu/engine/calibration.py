"""Calibration plumbing: the first block's inputs, a block run over every sample, which linears
share an input, Gram hooks.

The first block's inputs are captured with a ``forward_pre_hook(with_kwargs=True)`` that
keeps every keyword argument (``position_embeddings``, masks, ...) and stops the forward
with a private exception (at the first block of the last attention type, where types mix:
`BlockKwargs`). No KV cache is ever passed along (``use_cache=False``): a cache
reused across calibration samples makes each sample attend to the previous ones.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from ..checkpoint.adapter import adapter
from ..checkpoint.models import ModelError
from ..checkpoint.weights import Weight, as_weights, hook_inputs


class _StopForward(Exception):
    """Raised by the capture hook to stop the model's forward after block 0's inputs."""


def to_device(obj, device):
    """Move tensors (also inside tuples/lists/dicts) to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def module_device(module) -> torch.device:
    p = next(module.parameters(), None)
    if p is None:
        b = next(module.buffers(), None)
        return b.device if b is not None else torch.device("cpu")
    return p.device


@contextlib.contextmanager
def visiting(modules, device):
    """Move `modules` to `device` for the duration, then back where each one was."""
    homes = [(m, module_device(m)) for m in modules]
    try:
        for m, _ in homes:
            m.to(device)
        yield
    finally:
        for m, home in homes:
            m.to(home)


class BlockKwargs:
    """The keyword arguments (masks, ``position_embeddings``, ...) each decoder block is called
    with. One dict serves every block of a uniform model; where ``config.layer_types`` mixes
    attention types (Gemma-2's alternating sliding and full attention, Qwen2 with
    ``use_sliding_window``), each type has its own, since the model hands each block the mask of
    its type."""

    def __init__(self, by_type: dict, types: list | None = None):
        self.by_type, self.types = by_type, types

    def at(self, i: int) -> dict:
        """Block i's keyword arguments."""
        return self.by_type[self.types[i] if self.types else None]

    def to(self, device) -> "BlockKwargs":
        return BlockKwargs({t: to_device(kw, device) for t, kw in self.by_type.items()}, self.types)


def _firsts(model) -> dict:
    """{attention type: index of its first block} from ``config.layer_types`` ({None: 0} when
    the config has no types or a single one: block 0's arguments then serve every block)."""
    types = adapter(model).layer_types()
    if len(set(types)) < 2:
        return {None: 0}
    return {t: types.index(t) for t in dict.fromkeys(types)}


@torch.no_grad()
def capture_block_inputs(model, input_ids: torch.Tensor, device, store_device, progress=True):
    """Run the model up to decoder block 0 for each row of `input_ids` (batch 1).

    Returns (hidden states [n, seqlen, hidden] on `store_device`, the blocks' keyword arguments
    on `device` as a `BlockKwargs`). Only the modules before the blocks (embeddings, rotary)
    are moved to `device`; the blocks are never run (they may still be on the meta device).
    Where attention types mix, the forward goes on (earlier blocks passing their input
    through) to the first block of each type, once, to keep that type's arguments.
    """
    captured, by_type = {}, {}  # block 0's hidden states; each type's first arguments
    firsts = _firsts(model)
    shape = adapter(model)
    layers = shape.layers
    last = max(firsts.values())

    def hook(kind, i):
        def record(module, args, kwargs):
            if i == 0:
                captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            by_type.setdefault(kind, {k: v for k, v in kwargs.items() if k != "hidden_states"})
            if i == last:
                raise _StopForward
        return record

    handles = [layers[i].register_forward_pre_hook(hook(t, i), with_kwargs=True) for t, i in firsts.items()]
    hiddens = []
    try:
        with visiting(shape.before_blocks(), device), shape.passing_through(last):
            for i in tqdm(range(input_ids.shape[0]), desc="capture inputs", disable=not progress, leave=False):
                with contextlib.suppress(_StopForward):
                    shape.base(input_ids=input_ids[i:i + 1].to(device), use_cache=False)
                hiddens.append(captured["hidden"].to(store_device))
    finally:
        for h in handles:
            h.remove()
    for kwargs in by_type.values():
        for k in ("past_key_value", "past_key_values", "cache"):  # never carry a KV cache between samples
            if k in kwargs:
                kwargs[k] = None
        kwargs["use_cache"] = False
    types = None if None in firsts else shape.layer_types()
    return torch.cat(hiddens), BlockKwargs(by_type, types).to(device)


def release_memory(device: torch.device) -> None:
    """Give freed memory back after a block: the CUDA cache, and glibc's heap (`malloc_trim`:
    tensors below glibc's dynamic mmap threshold, up to 32 MiB, otherwise stay in the heap
    after they are freed, and the resident set creeps up by a few blocks). Our own because
    neither torch nor the standard library exposes it; a no-op where there is no glibc."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def block_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_block(block, hiddens: torch.Tensor, kwargs: dict, device, out: torch.Tensor | None = None):
    """Apply one block to every sample (batch 1); results written into `out` (or a new tensor)."""
    out = torch.empty_like(hiddens) if out is None else out
    for i in range(hiddens.shape[0]):
        out[i:i + 1] = block_output(block(hiddens[i:i + 1].to(device), **kwargs)).to(out.device)
    return out


@torch.no_grad()
def calibrate_block(block, hiddens: torch.Tensor, kwargs: dict, device):
    """Run `block` on every sample for its collectors' hooks only (the outputs are not
    needed): a collector made with ``stop=True`` ends each sample's forward once it has
    its inputs, so the rest of the block (down_proj and the residual: ~20 % of a LLaMA
    block's flops) never runs."""
    for i in range(hiddens.shape[0]):
        with contextlib.suppress(_StopForward):
            block(hiddens[i:i + 1].to(device), **kwargs)


@torch.no_grad()
def shared_input_groups(block, weights: list[Weight], hidden: torch.Tensor, kwargs: dict, device,
                        moe_calibration: str = "routed") -> list[list[Weight]]:
    """The `weights` of `block` grouped by the input they read, from one forward of the block
    on `hidden` (one sample): linears handed the very same tensor in every call (q/k/v the
    normed hidden states, gate/up the MLP's input) share one Gram, found by what runs, not by
    a table of names. Each expert's slice has its own input (its tokens), except that with
    ``moe_calibration="all"`` the gate_up slices of one experts module all read every token
    (one Gram). Groups come in the order of their first use in the forward, weights in a
    group in the order of `weights`.

    "The same tensor" is the same storage, offset, shape, stride and dtype: a view re-made
    with the same layout counts. Every input is kept alive until the end of the forward, so
    no freed address is reused within it. A linear never called (an unused module) raises a
    ModelError naming it: it would get no Gram.
    """
    if weights and isinstance(weights[0], str):  # names of linears: the groups by name
        groups = shared_input_groups(block, as_weights(weights), hidden, kwargs, device, moe_calibration)
        return [[w.name for w in g] for g in groups]
    calls: list[tuple[str, tuple]] = []
    alive: list[torch.Tensor] = []

    def record(w: Weight, x: torch.Tensor):
        if w.expert is not None:  # by position, not by address (an expert's rows are a new tensor)
            shared = moe_calibration == "all" and w.param == "gate_up_proj"
            calls.append((w.name, (w.module, w.param, None if shared else w.expert)))
            return
        alive.append(x)
        calls.append((w.name, (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape),
                               x.stride(), x.dtype)))

    handles = hook_inputs(block, weights, record, moe_calibration)
    try:
        block(hidden.to(device), **kwargs)
    finally:
        for h in handles:
            h.remove()
    names = [w.name for w in weights]
    inputs = {n: tuple(key for m, key in calls if m == n) for n in names}  # each weight's calls, in order
    unused = [n for n in names if not inputs[n]]
    if unused:
        raise ModelError(f"{', '.join(unused)} of {type(block).__name__} received no input in a forward; "
                         f"it cannot be calibrated")
    first = {n: next(i for i, (m, _) in enumerate(calls) if m == n) for n in names}
    groups: dict[tuple, list[Weight]] = {}
    for w in weights:
        groups.setdefault(inputs[w.name], []).append(w)
    return sorted(groups.values(), key=lambda g: min(first[w.name] for w in g))


class GramCollector:
    """Forward pre-hooks accumulating XtX = sum x x^T of the inputs of chosen weights
    (`weights.hook_inputs`: a linear's input, or the tokens routed to an expert).

    Each sample's x^T x is a float32 product added into a float64 sum (`ACCUMULATE`): the
    sum then does not depend on the order of the samples, so ranks that each sum their
    share and add the shares (`Dist.sum_`) get the Gram one process gets, up to float64
    rounding, and the float32 Gram the solvers read (cast after the sum) is almost always
    the same bits. Summed in float32, 2 ranks and 1 process differed in 1.76 % of SmolLM2's
    mask entries and 0.19 % in perplexity (paper_notes/distributed.md); the float64 sum
    costs ~15-20 % of the Gram's time on this project's CPU (the Gram is ~13 % of a run).
    `tokens` counts the rows each weight saw (an expert's: the tokens routed to it).

    A context manager: the hooks are removed on exit, whatever happens inside. With
    ``stop=True`` the hook of the last of `weights` to run in a forward stops that forward
    (`calibrate_block` expects it): for passes whose outputs are thrown away. An expert's
    hook runs in every forward of its experts module, with or without tokens, so a forward
    is stopped where it should be even when an expert got nothing.
    """

    def __init__(self, block, weights: list[Weight], device, timer=None, stop: bool = False,
                 moe_calibration: str = "routed"):
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.timer = timer
        self.stop = stop
        weights = as_weights(weights)
        homes = self.homes(block, weights, device)
        for w in weights:
            self.grams[w.name] = self._zeros(w.in_features(block), homes[w.name])
            self.tokens[w.name] = 0
        self._pending = set(self.grams)  # names not yet seen in this forward (stop=True)
        self.handles = hook_inputs(block, weights, self._feed, moe_calibration)

    @classmethod
    def homes(cls, block, weights: list[Weight], device) -> dict:
        """Where each weight's sum lives: on `device`, except the experts' when together they
        exceed `device_room` (E x d^2 float64 entries per block): then on the host, each moved
        to the device only for its own solve."""
        experts = [w for w in weights if w.expert is not None]
        nbytes = sum(cls._size(w.in_features(block)) for w in experts) * torch.finfo(ACCUMULATE).bits // 8
        offload = bool(experts) and nbytes > device_room(device)
        return {w.name: torch.device("cpu") if offload and w.expert is not None else torch.device(device)
                for w in weights}

    @staticmethod
    def _zeros(d_in: int, device) -> torch.Tensor:
        return torch.zeros(d_in, d_in, dtype=ACCUMULATE, device=device)

    @staticmethod
    def _size(d_in: int) -> int:
        return d_in * d_in

    @staticmethod
    def _accumulate(buf: torch.Tensor, x: torch.Tensor):
        """XtX += x^T x (a float32 product, added into the float64 `buf`), for inputs x of
        the model's dtype.

        CUDA, fp16/bf16 inputs: one half-precision GEMM with float32 output
        (``torch.mm(..., out_dtype=float32)``, tensor cores): the product of two fp16 or
        bf16 numbers is exact in float32, so this is the float32 Gram of the same inputs
        up to summation order (not measured on a GPU in this project yet). Otherwise x is
        cast to float32; on a CPU only the blocks on and above the diagonal of a grid of
        ~384-wide column blocks (`_sym_edges`) are computed, mirrored once by `_finish`:
        torch has no symmetric rank-k update, and the blocked GEMMs skip ~40 % of the
        flops (measured on this project's 2-core CPU, 16384 tokens: d_in 576 81 -> 62 ms,
        1536 592 -> 391 ms)."""
        if x.device.type == "cuda" and x.dtype in _HALF and _MM_OUT_DTYPE:
            buf.add_(torch.mm(x.T, x, out_dtype=torch.float32))
            return
        x = x.to(torch.float32)
        edges = _sym_edges(x.shape[1], x.device)
        if edges is None:
            buf.add_(torch.mm(x.T, x))
            return
        for i, (a, b) in enumerate(zip(edges, edges[1:])):
            for c, e in zip(edges[i:], edges[i + 1:]):
                buf[a:b, c:e].add_(torch.mm(x[:, a:b].T, x[:, c:e]))

    @staticmethod
    def _finish(buf: torch.Tensor):
        """Mirror the upper blocks `_accumulate` filled into the lower ones."""
        edges = _sym_edges(buf.shape[0], buf.device)
        for i, (a, b) in enumerate(zip(edges or (), (edges or ())[1:])):
            for c, e in zip(edges[i + 1:], edges[i + 2:]):
                buf[c:e, a:b] = buf[a:b, c:e].T

    def _feed(self, w: Weight, x: torch.Tensor):
        if x.shape[0]:
            buf = self.grams[w.name]
            with self._timed():
                self._accumulate(buf, x.to(buf.device))
        self.tokens[w.name] += x.shape[0]
        if self.stop:
            self._pending.discard(w.name)
            if not self._pending:
                self._pending = set(self.grams)
                raise _StopForward

    def _timed(self):
        return self.timer("gram") if self.timer is not None else contextlib.nullcontext()

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.remove()
        if exc_type is None:
            for buf in self.grams.values():
                self._finish(buf)


def device_room(device) -> float:
    """Bytes the experts' Grams may take on `device`: half its free memory on CUDA (the rest
    is the block, the activations and the solves), unbounded elsewhere (a CPU run's Grams are
    on the host anyway)."""
    device = torch.device(device)
    if device.type != "cuda":
        return float("inf")
    return torch.cuda.mem_get_info(device)[0] / 2


ACCUMULATE = torch.float64  # the collectors' sums: independent of sample order (class docstring)
_HALF = (torch.float16, torch.bfloat16)
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(..., out_dtype=) exists (CUDA kernels)


def _sym_edges(d: int, device: torch.device) -> list[int] | None:
    """Column-block edges for `GramCollector._accumulate` (None: one plain GEMM)."""
    nb = round(d / 384)
    if device.type != "cpu" or nb < 2:
        return None
    return [round(d * i / nb) for i in range(nb + 1)]


class NormCollector(GramCollector):
    """Forward hooks accumulating diag(XtX) = sum x^2 per input feature (a float64 sum, like
    the Grams): the squared column norms ||X_j||^2 that Wanda's and OWL's scores need,
    without d_in x d_in Grams."""

    @staticmethod
    def _zeros(d_in: int, device) -> torch.Tensor:
        return torch.zeros(d_in, dtype=ACCUMULATE, device=device)

    @staticmethod
    def _size(d_in: int) -> int:
        return d_in

    @staticmethod
    def _accumulate(buf: torch.Tensor, x: torch.Tensor):
        buf.add_(x.to(torch.float32).square().sum(0))  # diag(XtX) += sum_t x_t^2

    @staticmethod
    def _finish(buf: torch.Tensor):
        pass
