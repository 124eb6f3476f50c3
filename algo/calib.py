"""Layer-by-layer calibration support shared by pruning (algo.prune) and quantization (quant)."""
from __future__ import annotations

import torch


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer0_inputs(model, calib: torch.Tensor, batch: int) -> list[tuple[torch.Tensor, dict]]:
    """Run the model's embedding part on *calib* in batches of *batch* windows and return, per batch,
    the hidden states entering decoder layer 0 and the keyword arguments the layer is called with
    (no cache), so each layer can then be run on its own: ``layer(hidden, **kwargs)``."""
    captured = []

    def hook(_mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["cache"] = None
        kw["use_cache"] = False
        captured.append((h.detach(), kw))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in range(0, calib.shape[0], batch):
            try:
                model(input_ids=calib[b:b + batch], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def capture_layer0_calls(model, windows: list[torch.Tensor], make_cache) -> list[tuple[torch.Tensor, dict]]:
    """Like :func:`capture_layer0_inputs`, for forward calls with a KV cache: each of *windows* (input ids
    [1, T]) is run with a fresh ``make_cache()`` as ``model(input_ids=w, cache=..., use_cache=True)`` up to
    decoder layer 0; returns per window its hidden states and the layer's keyword arguments, the cache
    under ``"cache"`` (to be replaced by a fresh one of the same kind when the layer is run)."""
    captured = []

    def hook(_mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        captured.append((h.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for w in windows:
            try:
                model(input_ids=w, cache=make_cache(), use_cache=True)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured
