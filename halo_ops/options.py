"""The options of the token op, carried as one object from the public call to the launchers.

``TokenOptions`` holds everything the token op needs besides tensors. The public functions build it,
``torch.library`` carries it as one string argument (``encode`` / ``decode``: custom ops take no Python
objects), and the chunked path and the Triton launchers read its fields. The same two functions
carry any other frozen options dataclass (the fused losses' own options).
"""

from __future__ import annotations

import ast
import dataclasses
import functools

import torch

from .partials import kernel_stats_mask
from .transform import LogitTransform


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32: the dtype of every sum, log-prob and gradient accumulator."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class TokenOptions:
    impl: str  # "triton" or "torch", already resolved (halo_ops.inputs.resolve_impl)
    # a factory, not an instance: torch 2.7's dynamo cannot build a dataclass whose default is an instance
    transform: LogitTransform = dataclasses.field(default_factory=LogitTransform)
    ignore_index: int = -100
    # the per-token statistics to compute beside the log-probs, a subset of partials.STATISTICS in its order
    stats: tuple = ()
    schedule: str = "atomic"  # the backward's schedule, resolved: atomic, owner, slab (Triton) or chunked (torch)
    grad_filter_eps: float = 0.0  # softmax probabilities below it count as 0 in the backward
    save_jacobian: bool = False  # frozen head: the forward builds d logp / d hidden, the backward only scales it
    # block configs measured for this call's key (halo_ops.autotune): ((kernel, *the kernels.config.BlockConfig
    # fields), ...); a kernel not named takes kernels.config.select_config's
    configs: tuple = ()

    @property
    def kernel_stats(self) -> int:
        """The partial kinds the kernels fold for ``stats`` (``partials.kernel_stats_mask``: their ``STATS``)."""
        return kernel_stats_mask(self.stats, self.transform.softcap is not None)


def encode(options) -> str:
    """A frozen options dataclass as a string, the form a custom op's schema accepts: the constructor call
    that rebuilds it, e.g. ``TokenOptions(impl='torch', transform=LogitTransform(...), ...)``. Plain string
    formatting, so ``torch.compile`` traces it."""
    fields = []
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        nested = isinstance(value, tuple(_REGISTRY.values()))  # not is_dataclass: dynamo cannot trace it on a tuple
        fields.append(f"{field.name}={encode(value) if nested else repr(value)}")
    return type(options).__name__ + "(" + ", ".join(fields) + ")"


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Make an options dataclass decodable by name."""
    _REGISTRY[cls.__name__] = cls
    return cls


def _build(node: ast.expr):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        return _REGISTRY[node.func.id](**{kw.arg: _build(kw.value) for kw in node.keywords})
    return ast.literal_eval(node)


@functools.lru_cache(maxsize=256)
def decode(text: str):
    """The options dataclass ``encode`` wrote (registered classes and literals only; cached, since every call
    of an op decodes one of a few strings)."""
    return _build(ast.parse(text, mode="eval").body)


register(LogitTransform)
register(TokenOptions)
