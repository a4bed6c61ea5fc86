"""DeepSpeed ZeRO-3: gather partitioned parameters for a direct read, outside their module's forward.

A fused op reads ``lm_head.weight`` without calling the head module, so ZeRO-3's gather hooks never
fire; the op gathers the weight for the forward, and again for the backward's recompute. A no-op
for ordinary tensors, and when deepspeed is not installed.
"""

from __future__ import annotations

import contextlib

import torch


def gathered(*params: torch.Tensor | None):
    """Context in which every ZeRO-3 partitioned parameter among ``params`` holds its full data."""
    partitioned = [p for p in params if p is not None and hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # Deduplicated by identity (tied or shared heads); already available ones (e.g. tied embeddings in use) are skipped
    to_gather = {id(p): p for p in partitioned if p.ds_status != ZeroParamStatus.AVAILABLE}
    return deepspeed.zero.GatheredParameters(list(to_gather.values())) if to_gather else contextlib.nullcontext()
