"""Functional model (sim/emu.py) against an independent straightforward reference written here from
hw/numerics.py (int64 einsum, Python lists for the KV cache, no HBM byte layouts, no float BLAS), on
small synthetic packages built from random integer tensors; and bad programs -> status codes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from algo.recipe import load_recipe
from hw import isa, regmap
from hw import memmap as mm
from hw import numerics as nx
from hw.config import load_hw

CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, vocab_size=300, rms_norm_eps=1e-5, rope_theta=10000.0,
           max_position_embeddings=256, eos_token_id=2)


class FakePackage:
    """What hw.compiler needs from quant.package.Package, from random integers (package layout)."""

    def __init__(self, recipe, seed=0, sparse=True, bits=2, group=32):
        rng = np.random.default_rng(seed)
        self.recipe = recipe
        c = CFG
        H, I, L, Hq, Hkv, hd, V = (c[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"))
        self.manifest = {"model_config": dict(c), "recipe": recipe.to_dict(), "layers": {}}
        self.t = {"model.embed_tokens.weight": (rng.standard_normal((V, H)) * 0.5).astype(np.float16),
                  "model.norm.weight": (1 + 0.1 * rng.standard_normal(H)).astype(np.float16)}
        self.lin = {}

        def lin(name, N, K, b, g, sp):
            codes = rng.integers(0, 1 << b, (N, K))
            zeros = rng.integers(0, 1 << b, (N, K // g))
            scales = (rng.random((N, K // g)) * 0.05 + 0.005).astype(np.float16)
            mask = None
            if sp:
                mask = np.zeros((N, K), bool)
                pats = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
                sel = rng.integers(0, 6, (N, K // 4))
                for j, (a, bb) in enumerate(pats):
                    r, q = np.nonzero(sel == j)
                    mask[r, 4 * q + a] = True
                    mask[r, 4 * q + bb] = True
                codes = np.where(mask, codes, np.repeat(zeros, g, axis=1))
            self.lin[name] = (codes, zeros, scales, mask, b, g)
            self.manifest["layers"][name] = {"bits": b, "group": g}

        for i in range(L):
            p = f"model.layers.{i}"
            for n, N, K in (("q", Hq * hd, H), ("k", Hkv * hd, H), ("v", Hkv * hd, H), ("o", H, Hq * hd)):
                lin(f"{p}.self_attn.{n}_proj", N, K, bits, group, sparse)
            for n, N, K in (("gate", I, H), ("up", I, H), ("down", H, I)):
                lin(f"{p}.mlp.{n}_proj", N, K, bits, group, sparse)
            self.t[f"{p}.input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(H)).astype(np.float16)
            self.t[f"{p}.post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(H)).astype(np.float16)
            self.t[f"{p}.self_attn.k_scale"] = (rng.random((Hkv, hd)) * 0.2 + 0.05).astype(np.float16)
            self.t[f"{p}.self_attn.k_zero"] = rng.integers(4, 12, (Hkv, hd)).astype(np.float16)
        lin("lm_head", V, H, 8, 32, False)

    def tensor(self, name):
        return self.t[name]

    def linear(self, name):
        return self.lin[name]


def compile_fake(tmp_path, recipe_name="accllm", sets=(), hw_sets=(), **kw):
    from hw.compiler import compile_to_dir
    r = load_recipe(recipe_name, None, ["window=8", "sink_tokens=2", "kv_group_size=16", *sets])
    hw = load_hw("sim-small", list(hw_sets))
    pkg = FakePackage(r, **kw)
    compile_to_dir(pkg, hw, tmp_path, progress=False)
    return pkg, hw


class Host:
    """Drives an EmuDevice from memmap.json like the runtime does (register level)."""

    def __init__(self, d, hw):
        import json
        from sim.emu import EmuDevice
        self.m = json.loads((d / "memmap.json").read_text())
        self.dev = EmuDevice(hw)
        self.buf = {}
        for name, b in self.m["buffers"].items():
            self.buf[name] = self.dev.alloc(b["size"], port=b["port"], bank=b["bank"], name=name)
            if b.get("file"):
                self.buf[name].upload(np.fromfile(d / b["file"], dtype=np.uint8), b.get("file_offset", 0))
        self.pos = 0

    def run(self, ids, flags=1, entry="decode", position=None, program_len=None):
        e = entry if isinstance(entry, dict) else self.m["entries"]["decode"] if entry == "decode" else \
            next((x for x in self.m["entries"]["prefill"] if x["tokens"] >= len(ids)), self.m["entries"]["prefill"][-1])
        io = self.buf["io"]
        io.upload(np.asarray(ids, np.int32), self.m["io"]["tokens_in"]["offset"])
        for n, b in self.buf.items():
            self.dev.set_arg(n, b)
        self.dev.set_arg("entry", e["offset"])
        self.dev.set_arg("program_len", program_len if program_len is not None else e["offset"] + e["length"])
        self.dev.set_arg("position", self.pos if position is None else position)
        self.dev.set_arg("n_tokens", len(ids))
        self.dev.set_arg("flags", flags)
        self.dev.start()
        code = self.dev.wait(60)
        if code == 0:
            self.pos += len(ids)
        V = self.m["vocab_size"]
        cnt = self.m["io"]["logits_out"]["count"]
        raw = np.frombuffer(io.download(len(ids) * cnt * 4, self.m["io"]["logits_out"]["offset"]), np.int32)
        return code, self.dev.read_status()[1], raw.reshape(len(ids), cnt)[:, :V].astype(np.int64)


def reference_logits(pkg, hw, ids, S=2, W=8, vg=16, sp=None, blocks=None):
    """Straightforward reference: token by token, Λ visibility rule, per-head loops. *sp*: SpAtten
    (dict: token_keep / head_keep Q0.16 per layer, start, sinks, recent), indexed by position like
    algo/spatten.py (the device indexes by ring slot), deciding with the sort-based top-k after each of
    *blocks* (token counts of the device runs)."""
    from algo.topk import topk_reference
    c = CFG
    H, I, L, Hq, Hkv, hd = (c[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                           "num_attention_heads", "num_key_value_heads", "head_dim"))
    e40 = int(round(c["rms_norm_eps"] * 2.0 ** 40))

    def W_(name):
        codes, zeros, scales, mask, b, g = pkg.linear(name)
        M, SH = nx.scales_to_hw(scales, hw.scale_bits)
        return codes, zeros, M, SH, g, mask

    def lin(x8, w, name, dst=None):
        codes, zeros, M, SH, g, mask = W_(name)
        return nx.matmul(x8[0], x8[1], codes, zeros, M, SH, g, mask, dst)

    def norm(x, name):
        return nx.act_quant(nx.rmsnorm(x, nx.fp16_to_q16(pkg.tensor(name + ".weight")), e40))

    emb = nx.fp16_to_q16(pkg.tensor("model.embed_tokens.weight"))
    inv = 1.0 / (c["rope_theta"] ** (np.arange(0, hd, 2) / hd))
    F = nx.rope_freq_words(inv)
    cache = [[] for _ in range(L)]
    out = []
    imp = [dict() for _ in range(L)]              # layer -> {position: importance}
    himp = [[0] * Hq for _ in range(L)]
    pruned_at = {}                                # position -> layer it left at
    hpruned_at = [L] * Hq
    ends = set(np.cumsum(blocks) - 1) if blocks else set()
    for i, tok in enumerate(ids):
        x = emb[[tok]]
        for li in range(L):
            p = f"model.layers.{li}"
            h = norm(x, f"{p}.input_layernorm")
            q = lin(h, None, f"{p}.self_attn.q_proj").reshape(Hq, hd)
            k = lin(h, None, f"{p}.self_attn.k_proj").reshape(Hkv, hd)
            v = lin(h, None, f"{p}.self_attn.v_proj").reshape(Hkv, hd)
            C, Sn = nx.rope_cos_sin(np.array(i), F)
            qr, kr = nx.rope(q, C, Sn), nx.rope(k, C, Sn)
            Cc, Sc = nx.rope_cos_sin(np.array(min(i, S + W - 1)), F)
            qc = nx.rope(q, Cc, Sc)
            kc = nx.key_consts(pkg.tensor(f"{p}.self_attn.k_scale"), pkg.tensor(f"{p}.self_attn.k_zero"), hd)
            kq = nx.key_quant(kr, kc["RK"], kc["KS"], kc["KZ"])
            vq, vw = nx.value_quant(v, vg)
            cache[li].append((i, kq, vq, vw))
            vis = [e for e in cache[li] if e[0] <= i and (e[0] < S or e[0] > i - W)]
            if sp is not None:
                vis = [e for e in vis if pruned_at.get(e[0], L) > li]
                imp[li][i] = 0
            o = np.zeros((Hq, hd), np.int64)
            for hh in range(Hq):
                if sp is not None and hpruned_at[hh] <= li:
                    continue
                g = hh // (Hq // Hkv)
                s = np.array([nx.attn_scores(qc[hh] if e[0] < S else qr[hh], e[1][g][None], kc["KZ"][g],
                                             kc["KM"][g], int(kc["KSH"][g]))[0] for e in vis])
                pr = nx.softmax_q24(s)
                vh = np.stack([nx.value_dequant(e[2][g], e[3][g], vg) for e in vis])
                o[hh] = nx.attn_out(pr, vh)
                if sp is not None:
                    for e, pe in zip(vis, pr):
                        imp[li][e[0]] = min(imp[li][e[0]] + int(pe), nx.IMP_MAX)
                    himp[li][hh] = min(himp[li][hh] + int(nx.head_norm(o[hh])), nx.IMP_MAX)
            a8 = nx.act_quant(o.reshape(1, -1))
            x = lin(a8, None, f"{p}.self_attn.o_proj", dst=x)
            h = norm(x, f"{p}.post_attention_layernorm")
            gg = lin(h, None, f"{p}.mlp.gate_proj")
            uu = lin(h, None, f"{p}.mlp.up_proj")
            m8 = nx.act_quant(nx.silu_mul(gg, uu))
            x = lin(m8, None, f"{p}.mlp.down_proj", dst=x)
        h = norm(x, "model.norm")
        out.append(lin(h, None, "lm_head")[0])
        if sp is not None and i in ends:          # the device's TOPK at the end of the run
            stored = [p for p in range(i + 1) if p < S or p > i - W]
            cand = [p for p in stored if sp["sinks"] <= p <= i - sp["recent"]]
            run = {p: 0 for p in cand}
            hrun = [0] * Hq
            for li in range(L):
                for p in cand:
                    run[p] = min(run[p] + imp[li].get(p, 0), nx.IMP_MAX)
                hrun = [min(a + b, nx.IMP_MAX) for a, b in zip(hrun, himp[li])]
                if li < sp["start"]:
                    continue
                alive = [p for p in cand if pruned_at.get(p, L) > li]
                k = (sp["token_keep"][li] * len(cand)) >> 16
                if len(alive) > k:
                    keep = {alive[j] for j in topk_reference([run[p] for p in alive], k)}
                    for p in alive:
                        if p not in keep:
                            pruned_at[p] = li
                halive = [hh for hh in range(Hq) if hpruned_at[hh] > li]
                kh = max(1, (sp["head_keep"][li] * Hq) >> 16)
                if len(halive) > kh:
                    keep = {halive[j] for j in topk_reference([hrun[hh] for hh in halive], kh)}
                    for hh in halive:
                        if hh not in keep:
                            hpruned_at[hh] = li
    return np.stack(out)


@pytest.mark.parametrize("sparse,bits", [(True, 2), (False, 4)])
def test_emu_bit_exact_vs_reference_through_window_wrap(tmp_path, sparse, bits):
    pkg, hw = compile_fake(tmp_path, sparse=sparse, bits=bits)
    ids = list(np.random.default_rng(1).integers(3, 300, 14))      # 14 > S + W = 10: the ring wraps
    ref = reference_logits(pkg, hw, ids)
    h = Host(tmp_path, hw)
    code, _, lg = h.run(ids[:5], flags=isa.RF_LOGITS, entry="prefill")      # prefill of a partial bucket
    assert code == 0
    got = [lg]
    for t in ids[5:]:
        code, _, lg = h.run([t], flags=isa.RF_LOGITS)
        assert code == 0
        got.append(lg)
    got = np.concatenate(got)
    assert np.array_equal(got, ref), np.abs(got - ref).max()
    assert h.dev.cycles() > 0
    # the same tokens as prefill blocks whose appends wrap the ring inside a block (positions 8..13, S+W=10)
    h = Host(tmp_path, hw)
    got = []
    for blk in (ids[:8], ids[8:14]):
        code, _, lg = h.run(blk, flags=isa.RF_LOGITS, entry="prefill")
        assert code == 0
        got.append(lg)
    assert np.array_equal(np.concatenate(got), ref)


@pytest.mark.parametrize("attention,blocks", [("lambda", [5, 4] + [1] * 7), ("full", [5, 4] + [1] * 7),
                                              ("lambda", [3, 12, 1])])      # a block longer than W = 8
def test_emu_spatten_bit_exact_vs_reference(tmp_path, attention, blocks):
    """SpAtten on the device (ATTN.spatten + TOPK, state per ring slot) against the position-indexed
    reference: the same logits for prefill blocks and decode steps, through the window wrap."""
    sets = ["token_keep=0.5", "head_keep=0.5", "spatten_start_layer=0", "spatten_recent=2"]
    if attention == "full":
        sets.append("attention=full")
    pkg, hw = compile_fake(tmp_path, sets=sets)
    r = pkg.recipe
    sp = dict(token_keep=[nx.keep_q16(r.token_keep)] * 2, head_keep=[nx.keep_q16(r.head_keep)] * 2, start=0,
              sinks=r.sink_tokens, recent=2)
    ids = list(np.random.default_rng(2).integers(3, 300, 16))
    S, W = (2, 8) if attention == "lambda" else (0, 10 ** 6)
    ref = reference_logits(pkg, hw, ids, S=S, W=W, sp=sp, blocks=blocks)
    plain = reference_logits(pkg, hw, ids, S=S, W=W)
    assert not np.array_equal(ref, plain)            # the pruning changes the result
    h = Host(tmp_path, hw)
    got, at = [], 0
    for n in blocks:
        code, _, lg = h.run(ids[at:at + n], flags=isa.RF_LOGITS, entry="prefill" if n > 1 else "decode")
        assert code == 0, h.dev.last_error
        got.append(lg)
        at += n
    got = np.concatenate(got)
    assert np.array_equal(got, ref), np.abs(got - ref).max()
    st = h.dev.spatten_stats()
    assert 0 < st["kv_reads_saved"] < 1 and 0 < st["attention_reads_saved"] < 1
    # a new sequence at position 0 starts with every head alive again
    b0 = blocks[0]
    code, _, lg = h.run(ids[:b0], flags=isa.RF_LOGITS, entry="prefill", position=0)
    assert code == 0 and np.array_equal(lg, ref[:b0])


def test_argmax_and_skip(tmp_path):
    pkg, hw = compile_fake(tmp_path)
    h = Host(tmp_path, hw)
    code, _, lg = h.run([5, 6, 7], flags=isa.RF_LOGITS | isa.RF_ARGMAX, entry="prefill")
    assert code == 0
    am = int(np.frombuffer(h.buf["io"].download(4, h.m["io"]["argmax_out"]["offset"]), np.int32)[0])
    assert am == int(np.argmax(lg[-1]))
    # flags 0: no lm_head, still ok (and faster in cycles)
    c_all = h.dev.cycles()
    code, _, _ = h.run([8], flags=0)
    assert code == 0 and h.dev.cycles() < c_all


def _patch_word(host, index, word):
    host.buf["program"].upload(np.frombuffer(word, np.uint8), 16 * index)


def test_bad_programs_stop_with_status_and_index(tmp_path):
    pkg, hw = compile_fake(tmp_path)
    h = Host(tmp_path, hw)
    dec = h.m["entries"]["decode"]
    # unknown opcode at instruction 3
    bad = bytearray(h.buf["program"].read(16, 16 * 3))
    bad[0] = 0x7F
    _patch_word(h, 3, bytes(bad))
    code, idx, _ = h.run([5])
    assert (code, idx) == (regmap.STATUS_BAD_OPCODE, 3)
    # reserved field set
    _patch_word(h, 3, isa.struct.pack("<BBHIII", isa.END, 0, 0, 0, 0, 1))
    code, idx, _ = h.run([5])
    assert (code, idx) == (regmap.STATUS_BAD_OPCODE, 3)
    # program without END: program_len stops before END
    h2 = Host(tmp_path, hw)
    code, idx, _ = h2.run([5], program_len=dec["length"] - 1)
    assert (code, idx) == (regmap.STATUS_NO_END, dec["length"] - 1)
    # program_len beyond the program buffer (a truncated program): the fetch leaves the buffer
    last = max(h2.m["entries"]["prefill"], key=lambda e: e["offset"])
    end_idx = last["offset"] + last["length"] - 1
    assert (end_idx + 1) * 16 <= h2.buf["program"].size < (end_idx + 2) * 16 + 64
    _patch_word(h2, end_idx, isa.encode(isa.Instr(isa.NOP)))
    words = h2.buf["program"].size // 16
    for j in range(end_idx + 1, words):
        _patch_word(h2, j, isa.encode(isa.Instr(isa.NOP)))
    code, idx, _ = h2.run([5], entry=last, program_len=words + 5)
    assert (code, idx) == (regmap.STATUS_ADDR_RANGE, words)
    # address outside a buffer: EMBED writing past the io buffer
    h3 = Host(tmp_path, hw)
    _patch_word(h3, 0, isa.encode(isa.Instr(isa.EMBED, a=h3.buf["io"].size - 64, b=0, c=CFG["hidden_size"],
                                            d=h3.m["descriptors"]["embed"])))
    code, idx, _ = h3.run([5])
    assert (code, idx) == (regmap.STATUS_ADDR_RANGE, 0)
    # n_tokens beyond max_prefill
    h4 = Host(tmp_path, hw)
    code, idx, _ = h4.run(list(range(3, 3 + hw.max_prefill + 1)), entry="decode")
    assert code == regmap.STATUS_SHAPE


def test_bad_spatten_descriptors_stop_with_status(tmp_path):
    pkg, hw = compile_fake(tmp_path, sets=["token_keep=0.5", "spatten_start_layer=0"])
    h = Host(tmp_path, hw)
    dec = h.m["entries"]["decode"]
    words = [isa.decode(h.buf["program"].read(16, 16 * (dec["offset"] + i))) for i in range(dec["length"])]
    it = next(i for i, w in enumerate(words) if w.op == isa.TOPK)
    ia = next(i for i, w in enumerate(words) if w.op == isa.ATTN)
    assert words[ia].flags & isa.F_SPATTEN
    # TOPK pointing at something that is not a SpAtten descriptor (the embedding table)
    _patch_word(h, dec["offset"] + it, isa.encode(isa.Instr(isa.TOPK, d=h.m["descriptors"]["embed"])))
    code, idx, _ = h.run([5])
    assert (code, idx) == (regmap.STATUS_ADDR_RANGE, dec["offset"] + it)
    # the spatten flag on an attention descriptor without a SpAtten descriptor (compiled without SpAtten)
    d2 = tmp_path / "plain"
    d2.mkdir()
    compile_fake(d2)
    h2 = Host(d2, hw)
    dec2 = h2.m["entries"]["decode"]
    w = isa.decode(h2.buf["program"].read(16, 16 * (dec2["offset"] + ia)))
    _patch_word(h2, dec2["offset"] + ia, isa.encode(isa.Instr(w.op, w.a, w.b, w.c, w.d, isa.F_SPATTEN)))
    code, idx, _ = h2.run([5])
    assert (code, idx) == (regmap.STATUS_ADDR_RANGE, dec2["offset"] + ia)


def test_position_beyond_cache_full_attention(tmp_path):
    pkg, hw = compile_fake(tmp_path, "w2a8kv4", hw_sets=["max_context=16"])
    h = Host(tmp_path, hw)
    assert h.m["max_position"] == 16
    code, idx, _ = h.run([5], position=16)
    assert code == regmap.STATUS_POSITION
    assert isa.decode(h.buf["program"].read(16, 16 * idx)).op == isa.ATTN


def test_kv_region_too_small(tmp_path):
    pkg, hw = compile_fake(tmp_path)
    h = Host(tmp_path, hw)
    # point layer 1's attention descriptor at a V area past the KV buffer
    off = h.m["descriptors"]["model.layers.1.attn"]
    hdr = mm.parse_attn_header(h.buf["weights0"].read(64, off))
    hdr["v_off"] = h.buf["weights1"].size - 64          # V area of KV head 1 (port 1) runs past its buffer
    hdr.pop("magic")
    h.buf["weights0"].upload(np.frombuffer(mm.pack_attn_header(**hdr), np.uint8), off)
    code, idx, _ = h.run([5])
    assert code == regmap.STATUS_KV_REGION
    assert isa.decode(h.buf["program"].read(16, 16 * idx)).op == isa.ATTN


def test_compiler_refuses_what_hardware_cannot_run(tmp_path):
    from algo.common import AccllmError
    with pytest.raises(AccllmError, match="kv_bits"):
        compile_fake(tmp_path, "w2")
    with pytest.raises(AccllmError, match="spatten_start_layer"):
        compile_fake(tmp_path, sets=("token_keep=0.5", "spatten_start_layer=2"))     # the model has 2 layers
    with pytest.raises(AccllmError, match="max_context"):
        compile_fake(tmp_path, sets=("window=5000",))


def test_compiler_rope_theta_from_transformers5_config(tmp_path):
    """transformers >= 5 keeps the RoPE base in model_config["rope_parameters"] (no top-level
    rope_theta): the compiler must take it from there (SmolLM2: 100000, not the 10000 default)."""
    from algo.common import AccllmError
    from hw.compiler import compile_to_dir
    r = load_recipe("accllm", None, ["window=8", "sink_tokens=2", "kv_group_size=16"])
    hw = load_hw("sim-small", [])
    hd = CFG["head_dim"]
    pkg = FakePackage(r)
    cfg = pkg.manifest["model_config"]
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    compile_to_dir(pkg, hw, tmp_path, progress=False)
    import json
    off = json.loads((tmp_path / "memmap.json").read_text())["descriptors"]["rope"]
    F = np.fromfile(tmp_path / "hbm_w0.bin", np.uint8)[off:off + 4 * (hd // 2)].view("<u4")
    inv = 1.0 / (100000.0 ** (np.arange(0, hd, 2) / hd))
    assert np.array_equal(F.astype(np.int64), nx.rope_freq_words(inv))
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "llama3", "factor": 8.0}
    with pytest.raises(AccllmError, match="llama3 needs a positive low_freq_factor"):
        compile_to_dir(pkg, hw, tmp_path / "x", progress=False)
    cfg["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "yarn", "factor": 8.0}
    with pytest.raises(AccllmError, match="accepted rope_type: default, linear, llama3"):
        compile_to_dir(pkg, hw, tmp_path / "x", progress=False)
    # llama3 and linear scaling: only the table changes, to transformers' inverse frequencies
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for rp in ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64},
               {"rope_type": "linear", "factor": 4.0}):
        cfg["rope_parameters"] = {"rope_theta": 100000.0, **rp}
        compile_to_dir(pkg, hw, tmp_path / rp["rope_type"], progress=False)
        off = json.loads((tmp_path / rp["rope_type"] / "memmap.json").read_text())["descriptors"]["rope"]
        F = np.fromfile(tmp_path / rp["rope_type"] / "hbm_w0.bin", np.uint8)[off:off + 4 * (hd // 2)].view("<u4")
        hf_cfg = LlamaConfig(hidden_size=CFG["hidden_size"], num_attention_heads=CFG["num_attention_heads"],
                             head_dim=hd, max_position_embeddings=256, rope_parameters=dict(cfg["rope_parameters"]))
        inv, scale = ROPE_INIT_FUNCTIONS[rp["rope_type"]](hf_cfg, torch.device("cpu"))
        words = inv.double().numpy() * 2.0 ** 32 / (2 * np.pi)
        assert scale == 1.0 and np.all(np.abs(F - words) <= 0.5 + words * 2.0 ** -22), rp["rope_type"]
        assert not np.array_equal(F.astype(np.int64), nx.rope_freq_words(1.0 / (100000.0 ** (np.arange(0, hd, 2) / hd))))


@pytest.mark.parametrize("bits,sparse", [(2, True), (4, False), (8, False), (8, True)])
def test_int8_gemm_decode_path_is_exact(bits, sparse):
    from sim.emu import EmuDevice, _int_mm
    if _int_mm() is None:
        pytest.skip("torch._int_mm not available on this CPU build")
    rng = np.random.default_rng(7)
    N, K, g = 40, 256, 64
    codes = rng.integers(0, 1 << bits, (N, K))
    zeros = rng.integers(0, 1 << bits, (N, K // g))
    mask = (rng.random((N, K)) < 0.5) if sparse else None
    u = dict(codes=codes, zeros=zeros, mask=mask)
    w = dict(N=N, K=K, g=g, bits=bits, u=u, I8=None)
    x8 = rng.integers(-127, 128, (1, K)).astype(np.int8)
    G = EmuDevice._group_sums(w, x8)[:, :, 0].T
    d = nx.weight_diff(codes, zeros, g, mask)
    ref = np.einsum("ngk,gk->ng", d.reshape(N, K // g, g), x8[0].astype(np.int64).reshape(K // g, g))
    assert np.array_equal(G.astype(np.int64), ref)


def test_compiled_program_records_compiler_digest(tmp_path, monkeypatch):
    """The manifest's program block names the compiler that made it (the demo recompiles a cached
    package whose digest differs), and the digest follows the compiler's sources."""
    import hw.compiler as hc
    from hw.compiler import compile_to_dir
    r = load_recipe("accllm", None, ["window=8", "sink_tokens=2", "kv_group_size=16"])
    upd = compile_to_dir(FakePackage(r), load_hw("sim-small", []), tmp_path, progress=False)
    d = hc.compiler_digest()
    assert upd["program"]["compiler_digest"] == d and len(d) == 16
    fake = tmp_path / "src"
    fake.mkdir()
    for n in ("compiler.py", "memmap.py", "isa.py", "numerics.py", "config.py"):
        (fake / n).write_bytes((Path(hc.__file__).parent / n).read_bytes())
    (fake / "numerics.py").write_text((fake / "numerics.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(hc, "__file__", str(fake / "compiler.py"))
    assert hc.compiler_digest() != d
