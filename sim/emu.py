"""The functional model of the accelerator: executes program.bin on the packed HBM images with
exactly the integer numerics of hw/numerics.py (docs/numerics.md), behind the register-level device
interface of hw/device.py (s_axi_control at the Vitis offsets of hw/regmap.py, buffers in HBM banks).

Speed: linear layers run as float32 batched matrix products over groups — exact, because every group
sum |sum_k d*x| <= (2**b - 1) * 127 * g < 2**22 (b <= 8, g <= 128) and every partial sum is bounded by
the same sum of absolute values, so all intermediates are integers below 2**24, which float32
represents exactly; the group-scale accumulation sum_g G*M < 2**38 * 512 < 2**53 runs in float64,
also exact. The attention products use float64 with the bounds given at each call. Decoded weights
are cached per descriptor and dropped whenever the host writes a weight buffer, or when they pass
WEIGHT_CACHE_BYTES (4 GiB: a 7B model's decoded layers would not fit in memory; they are decoded again).

Bad programs stop with the status codes of hw/regmap.py and the failing instruction index, as the RTL
does: unknown opcode / reserved bits (1), an access outside a buffer or a missing descriptor (2), no
END before program_len (3), a position beyond the cache (4), a KV region too small (5), shapes beyond
the configuration (6).
"""
from __future__ import annotations

import numpy as np

from hw.device import MemoryDevice
from hw import isa, regmap
from hw import memmap as mm
from hw import numerics as nx
from hw.config import HWConfig


MATMUL_MAX_ROWS = 1 << 16     # rows one MATMUL may produce (hw/rtl/engine.OUT_WORDS)


class Fault(Exception):
    def __init__(self, code: int, msg: str = ""):
        super().__init__(msg)
        self.code = code


WEIGHT_CACHE_BYTES = 4 << 30    # decoded linear layers kept between runs; past it they are decoded again


def _nbytes(v) -> int:
    if isinstance(v, np.ndarray):
        return v.nbytes
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    if isinstance(v, dict):
        return sum(_nbytes(x) for x in v.values())
    nb = getattr(v, "nbytes", None)
    return nb if isinstance(nb, int) else 0


class EmuDevice(MemoryDevice):
    backend = "emu"

    def __init__(self, hw: HWConfig):
        super().__init__(hw)
        self._wcache: dict = {}
        self.weight_cache_bytes = WEIGHT_CACHE_BYTES
        self._wgen = 0
        self.trace: list[tuple[int, str, int]] | None = None     # (index, op, cycles) of the last run if enabled
        self.last_error: str = ""
        self.last_cycles_rtl = 0        # cycles of the last run on the RTL as built (sim/cycle.RtlCycleModel)
        self.cycles_rtl_total = 0
        self.spatten_reads = {"kv": 0.0, "kv_base": 0.0, "attn": 0.0, "attn_base": 0.0}

    # ---- memory -------------------------------------------------------------------------------
    def _dev_write(self, buf, offset, data):
        super()._dev_write(buf, offset, data)
        if buf.port.startswith("m_axi_w"):
            self._wcache.clear()

    def _bufs(self):
        def get(name):
            b = self.arg_buffer(name)
            if b is None:
                raise Fault(regmap.STATUS_ADDR_RANGE, f"pointer argument {name} is not the start of a buffer")
            return b.handle
        return get

    @staticmethod
    def _view(mem: np.ndarray, off: int, size: int, what: str) -> np.ndarray:
        if off < 0 or size < 0 or off + size > mem.size:
            raise Fault(regmap.STATUS_ADDR_RANGE, f"{what}: [{off}, {off + size}) outside its buffer ({mem.size} bytes)")
        return mem[off:off + size]

    def _x32(self, io, off, T, D, what):
        st = mm.stride32(D)
        v = self._view(io, off, T * st, what)
        return v.view("<i4").reshape(T, st // 4)[:, :D]

    def _x8_read(self, io, off, T, D, what):
        st = mm.stride8(D)
        v = self._view(io, off, T * st, what).reshape(T, st)
        words = v[:, :4].copy().view("<i4").reshape(T).astype(np.int64)
        return v[:, 64:64 + D].view(np.int8), words

    def _x8_write(self, io, off, codes, words, what):
        T, D = codes.shape
        st = mm.stride8(D)
        v = self._view(io, off, T * st, what).reshape(T, st)
        v[:, :4] = np.asarray(words, "<i4").reshape(T, 1).view(np.uint8)
        v[:, 64:64 + D] = codes.astype(np.int8).view(np.uint8)

    # ---- descriptors (cached decode) ------------------------------------------------------------
    def _linear(self, wbufs, off):
        """The linear layer at *off*. As the matrix engine (hw/rtl/kernel.MatmulUnit): only port 0's
        descriptor is read, and a descriptor it cannot run -- wrong magic included -- is STATUS_SHAPE;
        the records (rows_per_port x record bytes after the descriptor on every port) are read whatever
        the descriptor's end field says."""
        key = ("lin", off)
        if key in self._wcache:
            return self._wcache[key]
        hdr = self._view(wbufs[0], off, 64, "linear descriptor").tobytes()
        (magic, N, K, R, bits, sparse, group, scale_bits, rec, port, ports, data_off, _end) = mm.LIN_HEADER.unpack(hdr)
        fits = (magic == mm.MAGIC_LIN and bits in (2, 4, 8) and sparse <= 1 and scale_bits == self.hw.scale_bits
                and group in (16, 32, 64, 128) and 0 < K <= self.hw.max_hidden and K % group == 0
                and 0 < N <= MATMUL_MAX_ROWS and R * len(wbufs) >= N and ports == len(wbufs) and port == 0
                and data_off == mm.ALIGN and rec == mm.RowRecord(K, bits, group, bool(sparse), scale_bits).size)
        if not fits:
            raise Fault(regmap.STATUS_SHAPE, f"linear descriptor at 0x{off:x} the matrix engine cannot run: magic "
                                             f"0x{magic:08x}, N={N} K={K} bits={bits} group={group} sparse={sparse} "
                                             f"scale_bits={scale_bits} record={rec} port {port}/{ports} data at {data_off}")
        size = mm.ALIGN + R * rec
        imgs = [self._view(w, off, size, "linear layer") for w in wbufs]
        head = np.frombuffer(hdr[:40] + int(size).to_bytes(4, "little") + hdr[44:], np.uint8)   # end: the records' end
        imgs = [np.concatenate([head, im[mm.ALIGN:]]) for im in imgs]
        try:
            u = mm.unpack_linear(imgs)
        except Exception as e:
            raise Fault(regmap.STATUS_ADDR_RANGE, f"bad linear layer at 0x{off:x}: {e}")
        N, K, g = u["N"], u["K"], u["group"]
        ent = dict(N=N, K=K, g=g, M=u["M"].astype(np.float64).T.copy(), SH=u["SH"], bits=u["bits"],
                   sparse=u["sparse"], u=u, D=None, I8=None)
        self._wcache[key] = ent
        return ent

    def _trim(self, keep) -> None:
        """Keep the decoded linear layers within ``weight_cache_bytes`` (a 7B model's would not fit in
        memory): past it every other decoded layer is dropped, to be decoded again when next used."""
        lin = [k for k in self._wcache if k[0] == "lin"]
        if sum(_nbytes(self._wcache[k]) for k in lin) > self.weight_cache_bytes:
            for k in lin:
                if self._wcache[k] is not keep:
                    del self._wcache[k]

    def _embedding(self, wbufs, off):
        key = ("emb", off)
        if key not in self._wcache:
            heads = []
            for w in wbufs:
                try:
                    heads.append(mm.parse_embedding_header(self._view(w, off, 64, "embedding").tobytes()))
                except Fault:
                    raise
                except Exception as e:
                    raise Fault(regmap.STATUS_ADDR_RANGE, f"no embedding descriptor at 0x{off:x}: {e}")
            h = heads[0]
            rows = [self._view(w, off + 64, h["rows_per_port"] * h["D"] * 4, "embedding rows").view("<i4")
                    .reshape(h["rows_per_port"], h["D"]) for w in wbufs]
            self._wcache[key] = (h["V"], h["D"], np.concatenate(rows)[:h["V"]].astype(np.int64))
        return self._wcache[key]

    def _const(self, w0, off, kind):
        key = (kind, off)
        if key in self._wcache:
            return self._wcache[key]
        try:
            if kind == "spatten":
                if off % mm.ALIGN:
                    raise Fault(regmap.STATUS_SHAPE, f"SpAtten descriptor at 0x{off:x}: not {mm.ALIGN}-byte aligned")
                head = self._view(w0, off, 64, "SpAtten descriptor")[:8].view("<u4")
                if int(head[0]) != mm.MAGIC_SPT:
                    raise Fault(regmap.STATUS_ADDR_RANGE, f"no SpAtten descriptor at 0x{off:x} (magic 0x{int(head[0]):08x})")
                nl = int(head[1])
                if not 0 < nl <= self.hw.max_layers:
                    raise Fault(regmap.STATUS_SHAPE, f"SpAtten descriptor at 0x{off:x}: {nl} layers")
                val = mm.parse_spatten(self._view(w0, off, mm.spatten_bytes(nl), "SpAtten descriptor").tobytes())
                mh = mm.spatten_max_heads(self.hw.max_hidden)
                if not (0 < val["slots"] <= self.hw.max_context and 0 < val["heads"] <= mh and val["start_layer"] < nl):
                    raise Fault(regmap.STATUS_SHAPE, f"SpAtten descriptor at 0x{off:x}: layers {val['layers']}, "
                                                     f"slots {val['slots']} (max {self.hw.max_context}), heads "
                                                     f"{val['heads']} (max {mh})")
                if any(val[k] % mm.ALIGN for k in ("state_off", "layer_bytes", "imp_off", "dead_off", "himp_off", "hdead_off")):
                    raise Fault(regmap.STATUS_SHAPE, f"SpAtten descriptor at 0x{off:x}: state offsets not {mm.ALIGN}-byte aligned")
            elif kind == "norm":
                hdr = self._view(w0, off, 64, "norm descriptor")
                D = int(hdr[4:8].view("<u4")[0])
                val = mm.parse_norm(self._view(w0, off, 64 + 4 * D, "norm descriptor"))
            else:
                a = mm.parse_attn_header(self._view(w0, off, 64, "attention descriptor").tobytes())
                Hkv, hd = a["kv_heads"], a["head_dim"]
                lay = mm.kconst_layout(Hkv, hd)
                base = self._view(w0, a["kconst_off"], lay["_size"][0], "key constants")
                kc = {}
                for n, (o, cnt, dt) in lay.items():
                    if n != "_size":
                        kc[n] = base[o:o + cnt * np.dtype(dt).itemsize].view(dt).astype(np.int64)
                for n in ("RK", "KS", "KZ", "KM"):
                    kc[n] = kc[n].reshape(Hkv, hd)
                F = self._view(w0, a["rope_off"], 4 * (hd // 2), "rope frequencies").view("<u4").astype(np.int64)
                val = (a, kc, F)
        except Fault:
            raise
        except Exception as e:
            raise Fault(regmap.STATUS_ADDR_RANGE, f"no {kind} descriptor at 0x{off:x}: {e}")
        self._wcache[key] = val
        return val

    # ---- execution ------------------------------------------------------------------------------
    def execute(self):
        index = 0
        cycles = 0
        parts = []
        rtl_parts: list[float] = []
        self.last_error = ""
        try:
            from sim.cycle import CycleModel, RtlCycleModel
            cm = CycleModel(self.hw)
            rcm = RtlCycleModel(self.hw)
        except ImportError:       # pragma: no cover
            cm = None
        try:
            get = self._bufs()
            prog = get("program")
            io, kv = get("io"), get("kv")
            wbufs = [get(f"weights{p}") for p in range(self.hw.weight_ports)]
            plen = self.read_arg("program_len")
            entry = self.read_arg("entry") if "entry" in self.args else 0
            pos0 = self.read_arg("position")
            T = self.read_arg("n_tokens")
            flags = self.read_arg("flags")
            index = entry
            if not 1 <= T <= self.hw.max_prefill:
                raise Fault(regmap.STATUS_SHAPE, f"n_tokens={T} outside 1..max_prefill={self.hw.max_prefill}")
            if self.trace is not None:
                self.trace = []
            pc = entry
            while True:
                index = pc
                if pc >= plen:
                    raise Fault(regmap.STATUS_NO_END, f"reached program_len={plen} without END")
                word = self._view(prog, 16 * pc, 16, "instruction fetch").tobytes()
                try:
                    ins = isa.decode(word, pc)
                except isa.DecodeError as e:
                    raise Fault(regmap.STATUS_BAD_OPCODE, str(e))
                if ins.op == isa.END:
                    break
                info = self._exec(ins, io, kv, wbufs, pos0, T, flags)
                if cm is not None:
                    part = cm.instr_parts(ins, info, T)
                    parts.append(part)
                    rtl_parts.append(rcm.instr_cycles(ins, info, T))
                    if self.trace is not None:
                        self.trace.append((pc, ins.name, part))
                pc += 1
            cycles = int(cm.overlapped(parts)) if cm is not None else 0
            if cm is not None:
                # the same run on the RTL as built (sim/cycle.RtlCycleModel), accumulated for `bench rtl`
                self.last_cycles_rtl = int(rcm.program_cycles(rtl_parts))
                self.cycles_rtl_total += self.last_cycles_rtl
            return regmap.STATUS_OK, index, cycles
        except Fault as f:
            self.last_error = str(f)
            return f.code, index, cycles

    def _exec(self, ins, io, kv, wbufs, pos0, T, flags) -> dict:
        op = ins.op
        if op == isa.NOP:
            return {}
        if op == isa.EMBED:
            V, D, table = self._embedding(wbufs, ins.d)
            if D != ins.c:
                raise Fault(regmap.STATUS_SHAPE, f"EMBED D={ins.c} but the table has D={D}")
            ids = self._view(io, ins.b, 4 * T, "token ids").view("<i4").astype(np.int64)
            if ids.min() < 0 or ids.max() >= V:
                raise Fault(regmap.STATUS_ADDR_RANGE, f"token id outside the table (0..{V - 1})")
            self._x32(io, ins.a, T, D, "EMBED dst")[:] = table[ids]
            return dict(kind="embed", D=D)
        if op in (isa.RMSNORM, isa.QUANT, isa.SILUMUL, isa.ADD):
            D = ins.c
            if D == 0 or D > self.hw.max_hidden:
                raise Fault(regmap.STATUS_SHAPE, f"{ins.name} width {D} outside 1..max_hidden")
            if op == isa.RMSNORM:
                Dn, e40, gamma = self._const(wbufs[0], ins.d, "norm")
                if Dn != D:
                    raise Fault(regmap.STATUS_SHAPE, f"RMSNORM D={D} but gamma has {Dn}")
                x = self._x32(io, ins.b, T, D, "RMSNORM src").astype(np.int64)
                codes, words = nx.act_quant(nx.rmsnorm(x, gamma, e40))
                self._x8_write(io, ins.a, codes, words, "RMSNORM dst")
            elif op == isa.QUANT:
                codes, words = nx.act_quant(self._x32(io, ins.b, T, D, "QUANT src").astype(np.int64))
                self._x8_write(io, ins.a, codes, words, "QUANT dst")
            elif op == isa.SILUMUL:
                gu = self._x32(io, ins.b, T, 2 * D, "SILUMUL src").astype(np.int64)
                codes, words = nx.act_quant(nx.silu_mul(gu[:, :D], gu[:, D:]))
                self._x8_write(io, ins.a, codes, words, "SILUMUL dst")
            else:
                dst = self._x32(io, ins.a, T, D, "ADD dst")
                dst[:] = nx.add_sat(dst, self._x32(io, ins.b, T, D, "ADD src"))
            return dict(kind="sfu", D=D)
        if op == isa.MATMUL:
            return self._matmul(ins, io, wbufs, T, flags)
        if op == isa.ATTN:
            return self._attn(ins, io, wbufs, pos0, T)
        if op == isa.TOPK:
            return self._topk(ins, wbufs[0], pos0, T)
        if op == isa.ARGMAX:
            if not flags & isa.RF_ARGMAX:
                return dict(kind="skip")
            V = ins.d
            lg = self._x32(io, ins.b, T, V, "ARGMAX src")[T - 1]
            self._view(io, ins.a, 4, "ARGMAX dst").view("<i4")[0] = int(nx.argmax_first(lg))
            return dict(kind="argmax", V=V)
        raise Fault(regmap.STATUS_BAD_OPCODE, f"opcode 0x{op:02x}")   # pragma: no cover (decode rejects)

    def _matmul(self, ins, io, wbufs, T, flags) -> dict:
        w = self._linear(wbufs, ins.d)
        N, K, g = w["N"], w["K"], w["g"]
        rows = np.arange(T)
        if ins.flags & isa.F_LOGITS:
            if flags & isa.RF_LOGITS:
                pass
            elif flags & isa.RF_ARGMAX:
                rows = np.array([T - 1])
            else:
                return dict(kind="skip")
        x8, words = self._x8_read(io, ins.b, T, K, "MATMUL src")
        x8, words = x8[rows], words[rows]
        # torch._int_mm has a large fixed cost per call on CPU: used only for big decode products (lm_head)
        big = N * K >= 1 << 24
        G = self._group_sums(w, x8) if big and len(rows) == 1 and _int_mm() is not None else None
        if G is None:
            if w["D"] is None:
                u = w["u"]
                d = nx.weight_diff(u["codes"], u["zeros"], g, u["mask"])
                w["D"] = np.ascontiguousarray(d.reshape(N, K // g, g).transpose(1, 0, 2).astype(np.float32))
            X = np.ascontiguousarray(x8.astype(np.float32).reshape(len(rows), K // g, g).transpose(1, 2, 0))  # [ng, g, t]
            G = np.matmul(w["D"], X)                               # [ng, N, t] exact (< 2**22)
        self._trim(w)
        acc = (G.astype(np.float64) * w["M"][:, :, None]).sum(axis=0).T      # exact (< 2**47)
        acc = nx.sat(acc.astype(np.int64), nx.ACC_BITS)
        ma, ea = nx.scale_word_parts(words)
        y = nx.shift_sat32(acc * ma[:, None], w["SH"][None, :] - ea[:, None])
        dst = self._x32(io, ins.a, T, N, "MATMUL dst")
        if ins.flags & isa.F_ACC:
            y = nx.add_sat(dst[rows], y)
        dst[rows] = y
        return dict(kind="matmul", N=N, K=K, bits=w["bits"], group=g, sparse=w["sparse"], rows=len(rows))

    @staticmethod
    def _group_sums(w, x8):
        """Decode fast path: exact int8 x int8 -> int32 GEMM (torch._int_mm) against the block-diagonal
        arrangement of the token's activations, giving G [ng, N, 1]. 2/4-bit: d = code - zero fits int8.
        8-bit: codes (zero at pruned positions) split into nibbles, G = 16*G_hi + G_lo - zero*sum_g(x)."""
        import torch
        N, K, g = w["N"], w["K"], w["g"]
        ng = K // g
        u = w["u"]
        if w["I8"] is None:
            if w["bits"] <= 4:
                d = nx.weight_diff(u["codes"], u["zeros"], g, u["mask"])
                w["I8"] = (torch.from_numpy(d.astype(np.int8)),)
            else:
                c = u["codes"] if u["mask"] is None else np.where(u["mask"], u["codes"], np.repeat(u["zeros"], g, 1))
                w["I8"] = (torch.from_numpy((c >> 4).astype(np.int8)), torch.from_numpy((c & 15).astype(np.int8)),
                           u["zeros"].astype(np.int64))
        x = torch.from_numpy(np.ascontiguousarray(x8[0]).astype(np.int8))
        B = torch.zeros((K, max(ng, 8)), dtype=torch.int8)       # block-diagonal [K, ng] (>= 8 columns)
        idx = torch.arange(K)
        B[idx, idx // g] = x
        mm_ = _int_mm()
        if len(w["I8"]) == 1:
            G = mm_(w["I8"][0], B)[:, :ng].numpy().astype(np.int64)
        else:
            hi, lo, z = w["I8"]
            G = 16 * mm_(hi, B)[:, :ng].numpy().astype(np.int64) + mm_(lo, B)[:, :ng].numpy().astype(np.int64)
            G -= z * x8[0].astype(np.int64).reshape(ng, g).sum(-1)[None, :]
        return G.T[:, :, None].astype(np.float64)

    def _spatten_state(self, w0, spt, layer):
        """Views of one layer's SpAtten state in weights0: token importance / pruned flags per slot, head
        importance / pruned flags per query head (hw/memmap.spatten_state_layout)."""
        base = spt["state_off"] + layer * spt["layer_bytes"]
        n, H = spt["slots"], spt["heads"]
        try:
            return (self._view(w0, base + spt["imp_off"], 8 * n, "SpAtten token importance").view("<i8"),
                    self._view(w0, base + spt["dead_off"], n, "SpAtten token flags"),
                    self._view(w0, base + spt["himp_off"], 8 * H, "SpAtten head importance").view("<i8"),
                    self._view(w0, base + spt["hdead_off"], H, "SpAtten head flags"))
        except Fault as f:
            raise Fault(regmap.STATUS_KV_REGION, str(f))

    @staticmethod
    def _slot_positions(slots, S, W, ring, last):
        """Position held by every slot after the token at *last* was appended, and which slots hold one."""
        sl = np.arange(slots, dtype=np.int64)
        if ring:
            pos = np.where(sl < S, sl, last - ((last - S) - (sl - S)) % W)
            ok = (pos >= 0) & (pos <= last) & ((sl < S) | (pos >= S))
        else:
            pos = sl
            ok = sl <= last
        return pos, ok

    def _topk(self, ins, w0, pos0, T) -> dict:
        """TOPK: SpAtten's selection after the run (docs/numerics.md "SpAtten"), layer by layer from the start
        layer, on the cumulative importance (sum over layers <= l) of the alive older tokens / heads."""
        from algo.topk import topk_numpy
        spt = self._const(w0, ins.d, "spatten")
        L, H, S, R = spt["layers"], spt["heads"], spt["sink"], spt["recent"]
        ring = bool(spt["ring"])
        # the ring geometry of the attention unit (slots = S + W, W > 0; hw/rtl/topk_unit.py)
        Wr = spt["window"]
        if ring and (Wr == 0 or spt["slots"] != S + Wr):
            raise Fault(regmap.STATUS_SHAPE, f"SpAtten descriptor at 0x{ins.d:x}: ring S={S} W={Wr} slots {spt['slots']}")
        last = pos0 + T - 1
        pos, ok = self._slot_positions(spt["slots"], S, spt["window"], ring, last)
        cand = np.nonzero(ok & (pos >= S) & (pos <= last - R))[0]
        cand = cand[np.argsort(pos[cand], kind="stable")]         # position order: ties go to the lower position
        st = [self._spatten_state(w0, spt, li) for li in range(L)]
        sel = []
        # for the RTL cycle model: candidates in one or two runs of slots (the ring's rotation), and per
        # layer and kind (alive, k, quick-select rounds, any dropped so far)
        segs = 1 + int(cand.size > 1 and bool(np.any(np.diff(cand) != 1)))
        steps = []
        dropped = [False, False]

        def select(li, kind, run, idx, keep_q, at_least):
            """Keep the top-k alive entries of *run* (entry e is flag byte idx[e] of the layer's token
            (kind 0) or head (kind 1) flags); flag the others in this and every later layer."""
            flags = lambda lj: st[lj][1 + 2 * kind]          # noqa: E731
            alive = np.nonzero(flags(li)[idx] == 0)[0]
            k = nx.keep_count(keep_q, idx.size, at_least=at_least)
            rounds = []
            if alive.size > k:
                drop = np.setdiff1d(alive, alive[topk_numpy(run[alive], k, rounds)])
                for lj in range(li, L):
                    flags(lj)[idx[drop]] = 1
                sel.append(int(alive.size))
                dropped[kind] |= drop.size > 0
            steps.append(dict(n=int(idx.size), alive=int(alive.size), k=int(k), rounds=rounds, write=dropped[kind]))

        run = np.zeros(cand.size, np.int64)
        hrun = np.zeros(H, np.int64)
        for li in range(L):
            imp, dead, himp, hdead = st[li]
            run = nx.imp_add(run, imp[cand])
            hrun = nx.imp_add(hrun, himp)
            if li >= spt["start_layer"]:
                select(li, 0, run, cand, spt["token_keep_q"][li], 0)
                select(li, 1, hrun, np.arange(H), spt["head_keep_q"][li], 1)
        return dict(kind="topk", layers=L, slots=spt["slots"], heads=H, selected=sel, candidates=int(cand.size),
                    segments=segs, start_layer=int(spt["start_layer"]), steps=steps)

    def _attn(self, ins, io, wbufs, pos0, T) -> dict:
        """The whole block at once, exactly as token-by-token processing would do it: every query sees
        the keys kept before the block (a snapshot of the ring, so evictions by later tokens of the same
        block do not hide keys an earlier token still sees) plus the block's own keys up to itself, under
        the visibility rule j <= i and (j < S or j > i - W)."""
        a, kc, F = self._const(wbufs[0], ins.d, "attn")
        Hq, Hkv, hd, S, W, slots = a["heads"], a["kv_heads"], a["head_dim"], a["sink"], a["window"], a["slots"]
        vg = a["vgroup"]
        # hardware limits of the KV-cache unit / attention core (hw/rtl/attn_unit.py, docs/rtl.md):
        # head_dim <= 128 and a multiple of 16, value groups of a multiple of 16 channels, 4-bit KV
        if (Hkv == 0 or vg == 0 or a["kv_bits"] != 4 or Hq % Hkv or hd % vg or Hq * hd > self.hw.max_hidden
                or Hq == 0 or hd == 0 or hd > 128 or hd % 16 or vg < 16 or vg % 16):
            raise Fault(regmap.STATUS_SHAPE, f"attention descriptor shape (heads {Hq}/{Hkv}, head_dim {hd}, vgroup {vg}, "
                                             f"kv_bits {a['kv_bits']})")
        lam = bool(a["ring"])
        if (slots > self.hw.max_context or slots < 1 or (lam and (slots != S + W or W == 0))):
            raise Fault(regmap.STATUS_KV_REGION, f"KV slots {slots} (S={S}, W={W}) vs max_context={self.hw.max_context}")
        if not lam:
            S, W = 0, slots
        P = len(wbufs)
        lay = mm.kv_layout(1, -(-Hkv // P), hd, slots, vg)
        try:      # KV head h lives in weights<h % P> at local index h // P (hw/compiler.py, memmap.json "kv")
            Kh = [self._view(wbufs[h % P], a["k_off"] + (h // P) * slots * lay["k_slot"], slots * lay["k_slot"],
                             "K region").reshape(slots, lay["k_slot"]) for h in range(Hkv)]
            Vh = [self._view(wbufs[h % P], a["v_off"] + (h // P) * slots * lay["v_slot"], slots * lay["v_slot"],
                             "V region").reshape(slots, lay["v_slot"]) for h in range(Hkv)]
        except Fault as f:
            raise Fault(regmap.STATUS_KV_REGION, str(f))
        if not lam and pos0 + T > slots:
            raise Fault(regmap.STATUS_POSITION, f"position {max(pos0, slots)} beyond the {slots}-slot cache")
        width = (Hq + 2 * Hkv) * hd
        qkv = self._x32(io, ins.b, T, width, "ATTN src").astype(np.int64)
        grp = Hq // Hkv
        pos = pos0 + np.arange(T, dtype=np.int64)
        q = qkv[:, :Hq * hd].reshape(T, Hq, hd)
        k = qkv[:, Hq * hd:(Hq + Hkv) * hd].reshape(T, Hkv, hd)
        v = qkv[:, (Hq + Hkv) * hd:].reshape(T, Hkv, hd)
        C, Sn = nx.rope_cos_sin(pos, F)                                   # [T, hd/2]
        qr = nx.rope(q, C[:, None], Sn[:, None])
        kr = nx.rope(k, C[:, None], Sn[:, None])
        cache_rope = a["rope_mode"] == mm.ROPE_CACHE and lam
        if cache_rope:
            Cc, Sc = nx.rope_cos_sin(np.minimum(pos, slots - 1), F)
            qs = nx.rope(q, Cc[:, None], Sc[:, None])
        kq = nx.key_quant(kr, kc["RK"], kc["KS"], kc["KZ"])               # [T, Hkv, hd]
        vq, vw = nx.value_quant(v, vg)                                    # [T, Hkv, hd], [T, Hkv, hd/vg]
        # keys kept before the block: slot -> position
        opos, ovalid = self._slot_positions(slots, S, W, lam, pos0 - 1)
        oslots = np.nonzero(ovalid)[0]
        opos = opos[ovalid]
        kb = np.stack([k_[oslots] for k_ in Kh])
        okc = np.stack([kb & 15, kb >> 4], axis=-1).reshape(Hkv, oslots.size, hd).astype(np.int64)
        vb = np.stack([v_[oslots] for v_ in Vh])
        nw = 4 * (hd // vg)            # V record: the group words first, zero pad to 8 bytes, then the codes
        wa = mm.v_words_bytes(hd, vg)  # (hw/memmap.kv_layout)
        ovc = np.stack([vb[..., wa:] & 15, vb[..., wa:] >> 4], axis=-1).reshape(Hkv, oslots.size, hd).astype(np.int64)
        ovw = vb[..., :nw].copy().view("<u4").reshape(Hkv, oslots.size, hd // vg).astype(np.int64)
        # all candidate keys: old + the block's own
        kpos = np.concatenate([opos, pos])
        kcodes = np.concatenate([okc, kq.transpose(1, 0, 2)], axis=1)    # [Hkv, n, hd]
        vhat = np.concatenate([nx.value_dequant(ovc, ovw, vg), nx.value_dequant(vq, vw, vg).transpose(1, 0, 2)], axis=1)
        vis = (kpos[None, :] <= pos[:, None]) & ((kpos[None, :] < S) | (kpos[None, :] > pos[:, None] - W))   # [T, n]
        base_vis = vis
        sink_col = kpos < S
        spt = None
        head_alive = np.ones(Hq, bool)
        if ins.flags & isa.F_SPATTEN:
            ext = mm.parse_attn_ext(self._view(wbufs[0], ins.d + 64, 64, "attention descriptor (SpAtten word)"))
            spt = self._const(wbufs[0], ext["spatten_off"], "spatten")
            li = a["layer"]
            if li >= spt["layers"] or spt["slots"] != slots or spt["heads"] != Hq:
                raise Fault(regmap.STATUS_SHAPE, f"SpAtten descriptor (layers {spt['layers']}, slots {spt['slots']}, "
                                                 f"heads {spt['heads']}) does not match layer {li}'s attention")
            imp, dead, himp, hdead = self._spatten_state(wbufs[0], spt, li)
            if pos0 == 0:                      # a new sequence: every head alive, importance from zero
                himp[:] = 0
                hdead[:] = 0
            col_alive = np.concatenate([dead[oslots] == 0, np.ones(T, bool)])
            vis = vis & col_alive[None, :]
            head_alive = hdead == 0
        tok_imp = np.zeros(kpos.size, np.int64)
        out = np.zeros((T, Hq, hd), np.int64)
        kv_alive = 0
        for h in range(Hkv):
            if not head_alive[h * grp:(h + 1) * grp].any():
                continue                       # every query head of this KV head pruned: its KV is not read
            kv_alive += 1
            d = (kcodes[h] - kc["KZ"][h]).astype(np.float64)               # [n, hd], |d| <= 15
            hs = slice(h * grp, (h + 1) * grp)
            qf = nx.rshift_round(qr[:, hs] * kc["KM"][h], 16)               # [T, grp, hd], |qf| < 2**31
            sc = qf.astype(np.float64) @ d.T                                # [T, grp, n] exact (< 2**43)
            if cache_rope and sink_col.any():
                qf2 = nx.rshift_round(qs[:, hs] * kc["KM"][h], 16)
                sc2 = qf2.astype(np.float64) @ d[sink_col].T
                sc[:, :, sink_col] = sc2
            s_ = nx.shift_sat32(sc.astype(np.int64), int(kc["KSH"][h]) - 16)
            p_ = nx.softmax_q24(s_, np.broadcast_to(vis[:, None, :], s_.shape))   # [T, grp, n] Q8.24
            vh = vhat[h]
            lo = (vh & 0xFFFF).astype(np.float64)
            hi = (vh >> 16).astype(np.float64)
            pf = p_.astype(np.float64)
            o = (pf @ hi).astype(np.int64) * 65536 + (pf @ lo).astype(np.int64)   # each < 2**41: exact
            out[:, hs] = nx.sat(nx.rshift_round(o, 24), 32)
            if spt is not None:
                ha = head_alive[hs]
                out[:, hs] *= ha[None, :, None]               # a pruned head's output is 0
                tok_imp += (p_ * ha[None, :, None]).sum(axis=(0, 1))
        if spt is not None:
            self._spatten_reads(vis, base_vis, head_alive, kv_alive, Hq, Hkv)
            hn = nx.head_norm(out).sum(axis=0)                               # [Hq]
            himp[:] = np.where(head_alive, nx.imp_add(himp, hn), himp)
        # append the block to the ring (in order; a later token overwrites an earlier one's slot)
        slot = np.where((pos < S) | (not lam), pos, S + (pos - S) % W)
        kpk = (kq[..., 0::2] | (kq[..., 1::2] << 4)).astype(np.uint8)              # [T, Hkv, hd/2]
        vpk = (vq[..., 0::2] | (vq[..., 1::2] << 4)).astype(np.uint8)
        vwb = vw.astype("<u4").view(np.uint8).reshape(T, Hkv, -1)
        for h in range(Hkv):
            Kh[h][slot, :] = kpk[:, h]
            Vh[h][slot, :nw] = vwb[:, h]
            Vh[h][slot, nw:wa] = 0
            Vh[h][slot, wa:] = vpk[:, h]
        if spt is not None:
            # importance: the kept older tokens accumulate; an appended token starts from its own column
            # (a slot the block overwrites forgets the evicted token); later block tokens win a shared slot
            stay = ~np.isin(oslots, slot)
            imp[oslots[stay]] = nx.imp_add(imp[oslots[stay]], tok_imp[:oslots.size][stay])
            for t in range(T):
                imp[slot[t]] = tok_imp[oslots.size + t]
                dead[slot[t]] = 0
        codes, words = nx.act_quant(out.reshape(T, Hq * hd))
        self._x8_write(io, ins.a, codes, words, "ATTN dst")
        kept = min(pos0 + T, slots) if lam else pos0 + T
        info = dict(kind="attn", heads=int(head_alive.sum()), kv_heads=kv_alive, head_dim=hd, kept=kept,
                    slots=slots, vgroup=vg, pos0=pos0, spatten=spt is not None)
        if spt is not None:
            info["kept"] = int(vis[-1].sum())
            # for the RTL cycle model: per token the alive slots it reads and their runs of consecutive slots
            cslot = np.concatenate([oslots, slot])
            alive, runs = [], []
            for t in range(T):
                sl = np.sort(cslot[vis[t]])
                alive.append(int(sl.size))
                runs.append(int(1 + np.count_nonzero(np.diff(sl) != 1)) if sl.size else 0)
            info.update(alive=alive, runs=runs, all_heads=Hq, all_kv_heads=Hkv)
        return info

    def _spatten_reads(self, vis, base_vis, head_alive, kv_alive, Hq, Hkv) -> None:
        """KV rows read vs the same attention without SpAtten (algo.spatten.SpattenState.stats)."""
        r = self.spatten_reads
        nv, nb = float(vis.sum()), float(base_vis.sum())
        r["attn"] += nv * float(head_alive.sum())
        r["attn_base"] += nb * Hq
        r["kv"] += nv * kv_alive
        r["kv_base"] += nb * Hkv

    def spatten_stats(self) -> dict:
        from algo.spatten import read_savings
        return read_savings(self.spatten_reads)


_INT_MM = []


def _int_mm():
    """torch._int_mm (exact int8 GEMM with int32 accumulation) if this torch has it on CPU, else None."""
    if not _INT_MM:
        fn = None
        try:
            import torch
            a = torch.ones((32, 32), dtype=torch.int8)
            if int(torch._int_mm(a, a)[0, 0]) == 32:
                fn = torch._int_mm
        except Exception:
            fn = None
        _INT_MM.append(fn)
    return _INT_MM[0]


def open_emu(hw: HWConfig) -> EmuDevice:
    return EmuDevice(hw)
