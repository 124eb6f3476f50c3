"""The compiler: a compressed package -> accelerator programs + HBM images + memory map.

``compile_to_dir(package, hw, out_dir)`` writes into *out_dir*:
  program.bin    decode program (instruction 0) then one prefill program per bucket (hw/isa.py words)
  program.lst    the disassembly with entry labels and a comment per instruction
  memmap.json    buffers, entry points, io slots, KV geometry (hw/memmap.py; read by host/runtime.py)
  hbm_w<p>.bin   the image of weight port p (lockstep linear layers + embedding; constants on port 0)
and returns the manifest additions (``hw`` and ``program``). Float-stored linear layers (bits 0, e.g.
a tied lm_head) are quantized here to W8 g64 round-to-nearest: the matrix engine takes integer
weights only. The hardware always quantizes linear inputs per token to int8 (docs/numerics.md).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from algo.common import AccllmError, atomic_write_bytes, atomic_write_text

from . import isa
from . import memmap as mm
from . import numerics as nx
from .config import HWConfig


@dataclass
class LinearW:
    codes: np.ndarray      # [N, K] dense codes
    zeros: np.ndarray
    scales: np.ndarray     # fp16
    mask: np.ndarray | None
    bits: int
    group: int


def _np(t):
    try:
        import torch
        if torch.is_tensor(t):
            return t.detach().cpu().numpy()
    except ImportError:
        pass
    return np.asarray(t)


def rtn_w8(w: np.ndarray, group: int = 64) -> LinearW:
    """Round-to-nearest 8-bit asymmetric group quantization (same formulas as quant/quantizers.py)."""
    w = np.asarray(w, np.float32)
    N, K = w.shape
    g = group if K % group == 0 else math.gcd(K, group)
    wg = w.reshape(N, K // g, g)
    hi = np.maximum(wg.max(-1), 0)
    lo = np.minimum(wg.min(-1), 0)
    scale = np.maximum(((hi - lo) / 255).astype(np.float16), np.float16(2 ** -24))
    s = scale.astype(np.float32)
    zero = np.clip(np.round(-lo / s), 0, 255)
    codes = np.clip(np.round(wg / s[..., None]) + zero[..., None], 0, 255).reshape(N, K)
    return LinearW(codes.astype(np.int64), zero.astype(np.int64), scale, None, 8, g)


def package_linear(pkg, name: str) -> LinearW:
    lay = pkg.manifest["layers"].get(name)
    if lay is None:
        raise AccllmError(f"package has no linear layer {name!r}")
    if not lay.get("bits"):
        src = lay.get("tied_to") or f"{name}.weight"
        w = _np(pkg.tensor(src)).astype(np.float32)
        return rtn_w8(w)
    codes, zeros, scales, mask, b, g = pkg.linear(name)
    return LinearW(_np(codes).astype(np.int64), _np(zeros).astype(np.int64), _np(scales).astype(np.float16),
                   None if mask is None else _np(mask).astype(bool), int(b), int(g))


def concat_linears(ws: list[LinearW], what: str) -> LinearW:
    f = {(w.bits, w.group, w.mask is None) for w in ws}
    if len(f) != 1:
        raise AccllmError(f"{what}: the fused layers need the same bits, group and sparsity; got "
                          f"{[(w.bits, w.group, 'dense' if w.mask is None else 'sparse') for w in ws]}")
    return LinearW(np.concatenate([w.codes for w in ws]), np.concatenate([w.zeros for w in ws]),
                   np.concatenate([w.scales for w in ws]),
                   None if ws[0].mask is None else np.concatenate([w.mask for w in ws]), ws[0].bits, ws[0].group)


def _is_24(mask: np.ndarray) -> bool:
    K = mask.shape[1]
    return K % 4 == 0 and bool((mask.reshape(mask.shape[0], K // 4, 4).sum(-1) == 2).all())


def linear_images(w: LinearW, hw: HWConfig) -> list[bytes]:
    M, SH = nx.scales_to_hw(w.scales, hw.scale_bits)
    if w.mask is not None and _is_24(w.mask):
        from quant.pack import encode_24
        kept, idx = encode_24(w.codes, w.mask)
        return mm.pack_linear(kept, w.zeros, M, SH, w.bits, w.group, idx=idx, scale_bits=hw.scale_bits,
                              ports=hw.weight_ports)
    codes = w.codes
    if w.mask is not None:       # other N:M: dense mode with code = zero at pruned positions (d = 0)
        codes = np.where(w.mask, codes, np.repeat(w.zeros, w.group, axis=1))
    return mm.pack_linear(codes, w.zeros, M, SH, w.bits, w.group, scale_bits=hw.scale_bits, ports=hw.weight_ports)


def rope_theta(cfg: dict) -> float:
    """RoPE base of a model_config: ``rope_parameters.rope_theta`` (transformers >= 5, which no longer
    writes a top-level ``rope_theta``) or ``rope_theta`` (older configs), 10000 if neither."""
    return rope_of(cfg)["rope_theta"]


def rope_of(cfg: dict) -> dict:
    """The model's RoPE (algo.models.rope_parameters): default, linear or llama3 scaling; others refused."""
    from algo.models import rope_parameters
    return rope_parameters(cfg, "compiler")


class _Area:
    """Bump allocator of one address space (64-byte aligned)."""

    def __init__(self, start: int = 0):
        self.top = start

    def take(self, n: int) -> int:
        a = self.top
        self.top = mm.align(a + max(int(n), 1))
        return a


def prefill_buckets(hw: HWConfig) -> list[int]:
    out, b = [], 8
    while b < hw.max_prefill:
        out.append(b)
        b *= 4
    out.append(hw.max_prefill)
    return sorted(set(x for x in out if x > 1))


def check_recipe_for_hw(rec, hw: HWConfig) -> None:
    """The recipe checks that need no model: refused before any compression by compile-model --hw."""
    if rec.kv_bits != 4:
        raise AccllmError(f"recipe kv_bits={rec.kv_bits}: the KV-cache unit stores 4-bit keys and values; use a "
                          f"recipe with kv_bits=4 (accllm, w2a8kv4)")
    if rec.kv_key_rope != "post":
        raise AccllmError(f"recipe kv_key_rope={rec.kv_key_rope}: keys quantized before RoPE would have to be rotated "
                          f"as they are read, which the KV-cache unit does not do yet; the accelerator runs "
                          f"kv_key_rope=post (keys quantized as stored, after RoPE)")
    if rec.kv_key_token_scale:
        raise AccllmError("recipe kv_key_token_scale=true: a dynamic scale per key token is not computed by the "
                          "KV-cache unit yet; the accelerator runs static per-channel key constants "
                          "(kv_key_token_scale=false)")
    if rec.attention == "lambda" and rec.sink_tokens + rec.window > hw.max_context:
        raise AccllmError(f"S + W = {rec.sink_tokens + rec.window} KV slots exceed max_context={hw.max_context} of "
                          f"{hw.name}; use a smaller window (--set window=N) or a larger configuration")


def spatten_config(rec, layers: int, heads: int):
    """The recipe's SpAtten settings (algo.spatten.SpattenConfig) when token or head pruning is on, else None."""
    from types import SimpleNamespace
    from algo.recipe import _ratio_active
    if not (_ratio_active(rec.token_keep) or _ratio_active(rec.head_keep)):
        return None
    from algo.spatten import config_from_recipe
    return config_from_recipe(rec, SimpleNamespace(num_hidden_layers=layers, num_attention_heads=heads))


def compile_to_dir(pkg, hw: HWConfig, out: str | Path, progress: bool = True) -> dict:
    from tqdm.auto import tqdm
    out = Path(out)
    man = pkg.manifest
    cfg = man["model_config"]
    rec = pkg.recipe
    H = int(cfg["hidden_size"])
    I = int(cfg["intermediate_size"])
    L = int(cfg["num_hidden_layers"])
    Hq = int(cfg["num_attention_heads"])
    Hkv = int(cfg.get("num_key_value_heads") or Hq)
    hd = int(cfg.get("head_dim") or H // Hq)
    V = int(cfg["vocab_size"])
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    rope = rope_of(cfg)
    # ---- checks against the configuration ---------------------------------------------------------
    for what, v in (("hidden_size", H), ("intermediate_size", I), ("q width", Hq * hd)):
        if v > hw.max_hidden:
            raise AccllmError(f"{what}={v} exceeds the {hw.name} configuration's max_hidden={hw.max_hidden}")
    if L > hw.max_layers:
        raise AccllmError(f"{L} layers exceed max_layers={hw.max_layers} of {hw.name}")
    check_recipe_for_hw(rec, hw)
    if hd % 2 or hd > 256:
        raise AccllmError(f"head_dim={hd}: the attention unit takes even head_dim <= 256")
    vgroup = min(rec.kv_group_size, hd)
    if rec.attention == "lambda":
        S, W = int(rec.sink_tokens), int(rec.window)
        slots = S + W
        rope_mode = mm.ROPE_CACHE if rec.rope_mode == "cache" else mm.ROPE_ORIGINAL
        max_position = None
    else:
        S, W = 0, min(hw.max_context, int(cfg.get("max_position_embeddings", hw.max_context)))
        slots = W
        rope_mode = mm.ROPE_ORIGINAL
        max_position = slots
    P = hw.weight_ports                  # (S + W <= max_context: check_recipe_for_hw; full: min'd above)
    from algo.models import sliding_window
    sw = sliding_window(cfg)
    if sw is not None and ((rec.attention == "lambda" and W > sw) or (rec.attention == "full" and slots > sw)):
        raise AccllmError(f"the model attends to its last sliding_window={sw} tokens; recipe attention={rec.attention} "
                          f"window={W} would show it more. Accepted: attention=lambda with window <= {sw} (compile-model "
                          f"--model makes full attention sink_tokens=0, window={sw})")
    sp = spatten_config(rec, L, Hq)

    # ---- weights: lockstep area on every port ----------------------------------------------------
    lock = _Area(0)
    port_chunks: list[list[tuple[int, bytes]]] = [[] for _ in range(P)]
    descs: dict[str, int] = {}

    def place(name: str, images: list[bytes]) -> int:
        size = max(len(b) for b in images)
        a = lock.take(size)
        for p in range(P):
            port_chunks[p].append((a, images[p]))
        descs[name] = a
        return a

    emb = nx.fp16_to_q16(_np(pkg.tensor("model.embed_tokens.weight")).astype(np.float16))
    place("embed", mm.pack_embedding(emb.astype(np.int32), P))
    del emb
    bar = tqdm(total=L + 1, desc="compile", disable=not progress, leave=False)
    for i in range(L):
        pre = f"model.layers.{i}"
        qkv = concat_linears([package_linear(pkg, f"{pre}.self_attn.{n}_proj") for n in "qkv"], f"layer {i} q/k/v")
        place(f"{pre}.qkv", linear_images(qkv, hw))
        place(f"{pre}.o", linear_images(package_linear(pkg, f"{pre}.self_attn.o_proj"), hw))
        gu = concat_linears([package_linear(pkg, f"{pre}.mlp.{n}_proj") for n in ("gate", "up")], f"layer {i} gate/up")
        place(f"{pre}.gate_up", linear_images(gu, hw))
        place(f"{pre}.down", linear_images(package_linear(pkg, f"{pre}.mlp.down_proj"), hw))
        bar.update(1)
    place("lm_head", linear_images(package_linear(pkg, "lm_head"), hw))
    bar.update(1)
    bar.close()

    # ---- KV cache: striped over the weight ports (KV head h on port h % P), same offsets on every port,
    # so the S + W slots of all heads stream from all pseudo-channels in parallel -----------------------
    hpp = -(-Hkv // P)
    kv = mm.kv_layout(L, hpp, hd, slots, vgroup)
    kv_base = lock.top
    for lay_ in kv["layers"]:
        lay_["k_off"] += kv_base
        lay_["v_off"] += kv_base

    # ---- constants on port 0 ---------------------------------------------------------------------
    const = _Area(kv_base + kv["total"])
    c_chunks: list[tuple[int, bytes]] = []

    def cput(name: str, data: bytes) -> int:
        a = const.take(len(data))
        c_chunks.append((a, data))
        descs[name] = a
        return a

    def norm(name):
        g = nx.fp16_to_q16(_np(pkg.tensor(f"{name}.weight")).astype(np.float16))
        return cput(name, mm.pack_norm(g, eps))

    # the RoPE frequency table (scaled RoPE types change only these words; docs/numerics.md)
    rope_off = cput("rope", np.asarray(nx.rope_freq_words(nx.rope_inv_freq(rope, hd)), "<u4").tobytes())
    spt_off, spt_info = 0, None
    if sp is not None:
        # SpAtten: importance / pruned-flag state (written by the device; zero in the image), then the descriptor
        if Hq > mm.SPATTEN_MAX_HEADS:
            raise AccllmError(f"SpAtten head pruning on the accelerator holds at most {mm.SPATTEN_MAX_HEADS} query heads "
                              f"per layer; this model has {Hq}. Compile with token_keep = head_keep = 1 (no SpAtten)")
        st = mm.spatten_state_layout(slots, Hq)
        state_off = cput("spatten_state", bytes(L * st["layer_bytes"]))
        tq = [nx.keep_q16(sp.token_keep[i]) if i >= sp.start_layer else 0 for i in range(L)]
        hq = [nx.keep_q16(sp.head_keep[i]) if i >= sp.start_layer else 0 for i in range(L)]
        spt_off = cput("spatten", mm.pack_spatten(tq, hq, layers=L, start_layer=sp.start_layer, sink=sp.sinks, window=W,
                                                  slots=slots, ring=int(rec.attention == "lambda"), recent=sp.recent,
                                                  heads=Hq, kv_heads=Hkv, state_off=state_off, **st))
        spt_info = dict(descriptor=spt_off, state=state_off, state_bytes=L * st["layer_bytes"], start_layer=sp.start_layer,
                        recent=sp.recent, token_keep_q16=tq, head_keep_q16=hq, **st)
    kcl = mm.kconst_layout(Hkv, hd)
    for i in range(L):
        pre = f"model.layers.{i}"
        norm(f"{pre}.input_layernorm")
        norm(f"{pre}.post_attention_layernorm")
        try:
            ks = _np(pkg.tensor(f"{pre}.self_attn.k_scale")).astype(np.float16).reshape(Hkv, hd)
            kz = _np(pkg.tensor(f"{pre}.self_attn.k_zero")).astype(np.float64).reshape(Hkv, hd)
        except (KeyError, AccllmError):
            raise AccllmError(f"package has no static key-quantization constants for layer {i} "
                              f"({pre}.self_attn.k_scale / k_zero); the KV-cache unit needs static per-channel keys") from None
        kc = nx.key_consts(ks, kz, hd)
        blob = bytearray(kcl["_size"][0])
        for nm_, (o, cnt, dt) in kcl.items():
            if nm_ != "_size":
                arr = np.asarray(kc[nm_]).reshape(-1).astype(dt)
                blob[o:o + arr.nbytes] = arr.tobytes()
        kco = cput(f"{pre}.kconst", bytes(blob))
        hdr = mm.pack_attn_header(layer=i, heads=Hq, kv_heads=Hkv, head_dim=hd, sink=S, window=W, slots=slots,
                                  rope_mode=rope_mode, ring=int(rec.attention == "lambda"), k_off=kv["layers"][i]["k_off"],
                                  v_off=kv["layers"][i]["v_off"], rope_off=rope_off, kconst_off=kco,
                                  vgroup=vgroup, kv_bits=4)
        cput(f"{pre}.attn", hdr + mm.pack_attn_ext(spt_off))
    norm("model.norm")

    # ---- io layout ---------------------------------------------------------------------------------
    T = hw.max_prefill
    io = _Area(0)
    tok_off = io.take(4 * T)
    arg_off = io.take(64)
    logit_stride = mm.stride32(V)
    log_off = io.take(T * logit_stride)
    x_off = io.take(T * mm.stride32(H))
    h8_off = io.take(T * mm.stride8(max(H, Hq * hd)))
    qkv_off = io.take(T * mm.stride32((Hq + 2 * Hkv) * hd))
    a8_off = io.take(T * mm.stride8(Hq * hd))
    gu_off = io.take(T * mm.stride32(2 * I))
    m8_off = io.take(T * mm.stride8(I))
    # q/k/v biases (Qwen2): per layer T copies of the Q16.16 bias row [b_q | b_k | b_v] in io (the image
    # io.bin, uploaded with the weights), added by one ADD onto the int32 [q|k|v] rows of the MATMUL
    qkv_w = (Hq + 2 * Hkv) * hd
    biases = qkv_biases(pkg, L, [Hq * hd, Hkv * hd, Hkv * hd])
    bias_off, bias_img = 0, b""
    if biases is not None:
        if qkv_w > hw.max_hidden:
            raise AccllmError(f"q/k/v biases: the [q|k|v] row of {qkv_w} values is added by one ADD, which takes at "
                              f"most max_hidden={hw.max_hidden} of {hw.name}; accepted: (heads + 2 kv_heads) * head_dim "
                              f"<= max_hidden")
        st = mm.stride32(qkv_w)
        rows = np.zeros((L, T, st // 4), "<i4")
        rows[:, :, :qkv_w] = biases[:, None, :]
        bias_img = rows.tobytes()
        bias_off = io.take(len(bias_img))

    # ---- program -----------------------------------------------------------------------------------
    def program() -> tuple[list[isa.Instr], list[str]]:
        ins, cm = [], []

        def emit(i, c):
            ins.append(i)
            cm.append(c)
        emit(isa.Instr(isa.EMBED, a=x_off, b=tok_off, c=H, d=descs["embed"]), "x = embed(ids)")
        for i in range(L):
            pre = f"model.layers.{i}"
            emit(isa.Instr(isa.RMSNORM, a=h8_off, b=x_off, c=H, d=descs[f"{pre}.input_layernorm"]),
                 f"L{i} h = rmsnorm(x) -> int8")
            emit(isa.Instr(isa.MATMUL, a=qkv_off, b=h8_off, c=i, d=descs[f"{pre}.qkv"]), f"L{i} [q|k|v] = h W_qkv")
            if biases is not None:
                emit(isa.Instr(isa.ADD, a=qkv_off, b=bias_off + i * T * mm.stride32(qkv_w), c=qkv_w),
                     f"L{i} [q|k|v] += [b_q|b_k|b_v] (io.bin rows)")
            emit(isa.Instr(isa.ATTN, a=a8_off, b=qkv_off, c=i, d=descs[f"{pre}.attn"],
                           flags=isa.F_SPATTEN if sp is not None else 0),
                 f"L{i} a = attention(q, k, v; KV cache{'; SpAtten' if sp is not None else ''}) -> int8")
            emit(isa.Instr(isa.MATMUL, a=x_off, b=a8_off, c=i, d=descs[f"{pre}.o"], flags=isa.F_ACC), f"L{i} x += a W_o")
            emit(isa.Instr(isa.RMSNORM, a=h8_off, b=x_off, c=H, d=descs[f"{pre}.post_attention_layernorm"]),
                 f"L{i} h = rmsnorm(x) -> int8")
            emit(isa.Instr(isa.MATMUL, a=gu_off, b=h8_off, c=i, d=descs[f"{pre}.gate_up"]), f"L{i} [g|u] = h W_gate_up")
            emit(isa.Instr(isa.SILUMUL, a=m8_off, b=gu_off, c=I), f"L{i} m = silu(g) * u -> int8")
            emit(isa.Instr(isa.MATMUL, a=x_off, b=m8_off, c=i, d=descs[f"{pre}.down"], flags=isa.F_ACC),
                 f"L{i} x += m W_down")
        emit(isa.Instr(isa.RMSNORM, a=h8_off, b=x_off, c=H, d=descs["model.norm"]), "h = rmsnorm(x) -> int8")
        emit(isa.Instr(isa.MATMUL, a=log_off, b=h8_off, c=L, d=descs["lm_head"], flags=isa.F_LOGITS),
             "logits = h W_lm_head (register flags)")
        emit(isa.Instr(isa.ARGMAX, a=arg_off, b=log_off, d=V), "token = argmax(logits of the last token)")
        if sp is not None:
            emit(isa.Instr(isa.TOPK, d=spt_off), "SpAtten: top-k tokens / heads of every layer for the next run")
        emit(isa.Instr(isa.END), "end")
        return ins, cm

    words, labels, comments = [], {}, {}
    entries = {}
    for name, tokens in [("decode", 1)] + [(f"prefill{b}", b) for b in prefill_buckets(hw)]:
        ins, cm = program()
        labels[len(words)] = f"{name} (n_tokens <= {tokens})"
        for k, c in enumerate(cm):
            comments[len(words) + k] = c
        entries[name] = dict(offset=len(words), length=len(ins), tokens=tokens)
        words.extend(ins)
    prog = isa.encode_program(words)

    # ---- HBM images ---------------------------------------------------------------------------------
    files = {}
    for p in range(P):
        end = lock.top if p else const.top
        img = bytearray(mm.align(max(end, 64)))
        if p:
            img = img[:kv_base]             # the KV area of ports > 0 is not part of the file (zeroed buffer)
        for a, data in port_chunks[p]:
            img[a:a + len(data)] = data
        if p == 0:
            for a, data in c_chunks:
                img[a:a + len(data)] = data
        atomic_write_bytes(out / f"hbm_w{p}.bin", bytes(img))
        files[f"weights{p}"] = dict(port=f"m_axi_w{p}", bank=p % 32, size=max(len(img), kv_base + kv["total"]),
                                    file=f"hbm_w{p}.bin", file_offset=0)
    atomic_write_bytes(out / "program.bin", prog)
    io_buf = dict(port="m_axi_ctrl", bank=0, size=io.top)
    if biases is not None:
        atomic_write_bytes(out / IO_IMAGE, bias_img)
        io_buf.update(file=IO_IMAGE, file_offset=bias_off)
    elif (out / IO_IMAGE).exists():
        (out / IO_IMAGE).unlink()           # a recompile of the package without biases
    listing = isa.disassemble(prog, labels=labels, comments=comments)
    atomic_write_text(out / "program.lst", f"; accllm program for {hw.name} ({len(words)} words)\n" + listing + "\n")

    eos = cfg.get("eos_token_id")
    memmap = {
        "format": mm.FORMAT, "version": mm.VERSION, "hw": hw.name,
        "buffers": {
            "program": dict(port="m_axi_ctrl", bank=0, size=mm.align(len(prog)), file="program.bin", file_offset=0),
            "io": io_buf,
            "kv": dict(port="m_axi_ctrl", bank=1, size=mm.ALIGN),      # reserved in v1: KV lives in weights<p>
            **files,
        },
        "entries": {"decode": entries["decode"],
                    "prefill": [dict(tokens=e["tokens"], offset=e["offset"], length=e["length"])
                                for k, e in entries.items() if k != "decode"]},
        "io": {"tokens_in": dict(offset=tok_off, dtype="int32", count=T),
               "logits_out": dict(offset=log_off, dtype="int32", count=logit_stride // 4, scale=2.0 ** -16),
               "argmax_out": dict(offset=arg_off, dtype="int32", count=1),
               "scratch": dict(x=x_off, h8=h8_off, qkv=qkv_off, a8=a8_off, gu=gu_off, m8=m8_off)},
        "logits_rows": "all",
        "prefill_partial": True,
        "qkv_bias": None if biases is None else dict(offset=bias_off, bytes=len(bias_img), width=qkv_w),
        "attention": dict(kind=rec.attention, sink=S, window=W, slots=slots,
                          rope_mode=rec.rope_mode if rec.attention == "lambda" else "original"),
        "spatten": spt_info,
        "max_position": max_position,
        "vocab_size": V,
        "eos_token_id": eos[0] if isinstance(eos, list) else eos,
        "kv": dict(layers=L, kv_heads=Hkv, head_dim=hd, slots=slots, vgroup=vgroup, k_slot_bytes=kv["k_slot"],
                   v_slot_bytes=kv["v_slot"], placement="striped over the weight buffers: KV head h in weights<h % P> "
                   "at local head index h // P; per port and layer a K area [heads_per_port][slots][k_slot] then a V "
                   "area [heads_per_port][slots][v_slot], at the attention descriptor's k_off / v_off",
                   base=kv_base, heads_per_port=hpp, bytes_per_port=kv["total"], bytes_per_layer_per_port=kv["per_layer"]),
        "model": dict(hidden=H, intermediate=I, layers=L, heads=Hq, kv_heads=Hkv, head_dim=hd, vocab=V),
        "descriptors": descs,
        "flags": {"logits_all_rows": isa.RF_LOGITS, "argmax_last": isa.RF_ARGMAX},
    }
    mm.validate_memmap(memmap)
    atomic_write_text(out / "memmap.json", json.dumps(memmap, indent=1))
    return {"hw": hw.to_dict(),
            "program": {"words": len(words), "entries": entries, "weight_bytes_per_port": [f["size"] for f in files.values()],
                        "kv_bytes_per_port": kv["total"], "io_bytes": io.top, "isa_version": isa.VERSION,
                        "compiler_digest": compiler_digest()}}


def compiler_digest() -> str:
    """Hash of the sources that decide a compiled program and its weight images (this compiler, the
    memory map, the ISA, the numerics, the configurations): a cached package whose digest differs
    was compiled by another version and is compiled again (``recompile``) before it is used."""
    import hashlib
    h = hashlib.sha256()
    for n in ("compiler.py", "memmap.py", "isa.py", "numerics.py", "config.py"):
        h.update(n.encode())
        h.update((Path(__file__).resolve().parent / n).read_bytes())
    return h.hexdigest()[:16]


IO_IMAGE = "io.bin"


def program_files(directory=None) -> list[str]:
    """The files compile_to_dir writes besides hbm_w<p>.bin (io.bin only for a model with q/k/v biases:
    given *directory*, the ones present there)."""
    names = ["program.bin", "program.lst", "memmap.json", IO_IMAGE]
    if directory is None:
        return names
    return [n for n in names if (Path(directory) / n).is_file()]


def qkv_biases(pkg, L: int, widths: list[int]) -> np.ndarray | None:
    """The Q16.16 rows [L, sum(widths)] of the q/k/v biases (fp16 in the package, round half up as the
    embeddings; a projection without bias contributes zeros), or None when no layer has one."""
    rows, found = np.zeros((L, sum(widths)), np.int64), False
    layers = pkg.manifest["layers"]
    for i in range(L):
        at = 0
        for n, w in zip("qkv", widths):
            name = layers.get(f"model.layers.{i}.self_attn.{n}_proj", {}).get("bias")
            if name:
                b = _np(pkg.tensor(name)).astype(np.float16).reshape(-1)
                if b.size != w:
                    raise AccllmError(f"bias {name} has {b.size} values; its projection has {w} outputs")
                rows[i, at:at + w] = nx.fp16_to_q16(b)
                found = True
            at += w
    for name, lay in layers.items():
        if lay.get("bias") and not any(name.endswith(f".self_attn.{n}_proj") for n in "qkv"):
            raise AccllmError(f"layer {name} has a bias; the accelerator adds biases of q_proj, k_proj and "
                              f"v_proj only")
    return rows if found else None


def refresh_program(package_dir, hw: HWConfig, log=print) -> bool:
    """Compile the program of a cached package again (in place, stage 2 only, same weights) when an
    earlier version of the compiler made it (another memory map, ISA or numerics); True if it did."""
    man = json.loads((Path(package_dir) / "manifest.json").read_text())
    if man.get("program", {}).get("compiler_digest") == compiler_digest():
        return False
    log(f"the cached package {package_dir} was compiled by another version of the compiler; compiling its "
        "program again (stage 2 only, same weights)")
    recompile(package_dir, hw)
    return True


def recompile(package_dir, hw: HWConfig, out_dir=None, progress: bool = False, recipe=None) -> Path:
    """Compile an existing package again for *hw* (no recompression): into *out_dir* (a copy of the
    package, written atomically) or in place. Files of a previous compilation are replaced and the
    manifest's ``files``/``hw``/``program`` updated. *recipe*: the package's recipe with other
    attention-time keys (algo.recipe.apply_attention_sets), recorded in the manifest."""
    import shutil
    from algo.common import atomic_directory, sha256_file
    from quant.package import load_package, write_manifest
    src = Path(package_dir)
    pkg = load_package(src)
    target = Path(out_dir) if out_dir else src
    with atomic_directory(target) as tmp:
        tmp = Path(tmp)
        old_hw = [f for f in pkg.manifest.get("files", {}) if f.startswith("hbm_w") or f in program_files()]
        for f in src.iterdir():
            if f.is_file() and f.name not in old_hw:
                shutil.copy2(f, tmp / f.name)
        man = json.loads((tmp / "manifest.json").read_text())
        for f in old_hw:
            man["files"].pop(f, None)
        if recipe is not None and recipe.to_dict() != man["recipe"]:
            changed = {k: v for k, v in recipe.to_dict().items() if man["recipe"].get(k) != v}
            man.setdefault("recipe_changes", []).append({"by": "compile-model --package --set", "keys": changed})
            man["recipe"] = recipe.to_dict()
        from quant.package import Package
        upd = compile_to_dir(Package(tmp, man), hw, tmp, progress=progress)
        man.update(upd)
        for n in program_files(tmp) + [f"hbm_w{p}.bin" for p in range(hw.weight_ports)]:
            man["files"][n] = sha256_file(tmp / n)
        write_manifest(tmp, man)
    return target
