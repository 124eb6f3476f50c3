"""ATTN execution unit of the kernel: per token, RoPE, 4-bit KV append into the Λ ring
buffer, scores over the kept tokens, softmax, probabilities x values, per-token int8 quantization
of the attention output — bit-exactly ``sim/emu.py: EmuDevice._attn``.

Word: a = dst X8 (Hq*hd wide), b = src X32 [q | k | v] ((Hq + 2*Hkv)*hd wide), d = attention
descriptor (weights0, hw/memmap.ATN_HEADER), c = layer (informational).

Per instruction: the 64-byte descriptor and the RoPE frequencies (weights0 + rope_off).
Per token t (position p = position + t), for every KV head h (its K/V areas live in weights<h % P>
at local index h // P, hw/compiler.py):

  1. the head's key constants RK/KS/KZ/KM (hd each) and KSH (hw/memmap.kconst_layout) from weights0;
  2. k_h from io -> RoPE(p) -> key quantization -> the 4-bit record written to slot(p) of the K area;
     v_h from io -> value quantization (per group of vgroup channels) -> codes + words written to
     slot(p) of the V area (write DMA of port h % P, byte strobes; waits for the write responses);
  3. for each of the Hq/Hkv query heads g of the group: q_g from io -> RoPE(p) (and RoPE(min(p,
     slots - 1)) for the sink columns when rope_mode = cache under Λ) -> the attention core; the K
     area slots 0..n-1 stream in (n = min(p + 1, slots)), then the V area slots 0..n-1; the core's hd
     outputs go into the activation quantizer.
  4. the quantized row (codes + scale word) is written to io + a + t * stride8(Hq*hd).

Reading slots 0..n-1 in slot order is exact: after the append the cache holds precisely the tokens
the query sees (Λ: the sinks in slots 0..S-1, the last W positions in the window slots; linear:
positions 0..p), softmax and the P x V sums are order-independent integer arithmetic, and the sinks
are the first min(S, n) slots (the columns that use the cache-position query). Appending before
reading equals emu's block processing: a token evicted by a later token of the same block is outside
the earlier token's window anyway.

Status codes (as sim/emu.py): n_tokens outside 1..max_prefill, Hq % Hkv != 0, odd hd, vgroup 0 or
not dividing hd, Hq*hd > max_hidden -> STATUS_SHAPE; wrong descriptor magic -> STATUS_ADDR_RANGE;
slots < 1, > max_context, or != S + W under Λ -> STATUS_KV_REGION; linear cache and position + T >
slots -> STATUS_POSITION; src/dst past the 4 GiB offset space -> STATUS_ADDR_RANGE.
Limits of this build (STATUS_SHAPE, emu the same): hd <= 128 and a multiple of 16, vgroup a multiple of 16,
kv_bits 4. Scores and P x V take LANES = 16 channels per cycle: the K area streams as 64-bit items of 16
codes; each V record (its group words first, padded to 8 bytes, hw/memmap.kv_layout) streams the same
way: the group words (two per item) into a small buffer, then the codes 16 per cycle. Per kept slot and
query head: hd/16 + ceil(hd/vgroup / 2) + hd/16 cycles.

SpAtten (flag ``spatten``, docs/numerics.md "SpAtten", the same rules as sim/emu.py): the descriptor's
word 16 points at the SpAtten descriptor (checked like emu: magic -> STATUS_ADDR_RANGE; layers, slots,
heads (<= memmap.spatten_max_heads), start layer, 64-byte alignment of the state, layer / slots / heads
not those of this attention -> STATUS_SHAPE; state past the 4 GiB offset space -> STATUS_KV_REGION).
At the start the layer's pruned flags come on chip (1 bit per slot), and the head state (cleared at
position 0). Per token the appended slot is marked alive and "appended" (its importance restarts), then
one scan of slots 0..n-1 lists the alive slots and their runs of consecutive slots: the K and V areas
are read run by run (a pruned slot costs no read), the core gets only alive slots (a pruned one leaves
the softmax), and every probability the softmax emits is added to its slot's on-chip importance sum.
A pruned query head outputs zeros without reading K/V (so a KV head whose query heads are all pruned is
not read); an alive head's outputs also feed sum((o >> 8, rounded)^2) and the isqrt of that (27
cycles) adds to the head's sum. At the end the layer's importance row is read, updated (appended slot:
its new sum; a slot held before the block: the saturating add; any other: unchanged) and written back,
with the appended slots' pruned flags cleared (byte strobes), the head importance (alive heads: the
saturating add) and, at position 0, the cleared head flags. Extra cost per token: n cycles for the scan,
one read burst per run and per query head 27 + a few cycles; per instruction about 2.2 x slots + 2 x heads
cycles plus the row bursts.
"""
from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from hw import isa, memmap, regmap

from .attention import AttentionCore
from .kvcache import KeyQuant, ValueQuant
from .sfu import ActQuant, Divider, ISqrt, RoPE, rsr_c
from .unit import Unit, _end64, _fields

MAX_HD = 128          # largest head dimension of this build (Llama-2-7B: 128)
MAX_VREC = MAX_HD // 2 + 4 * (MAX_HD // 16)    # V record bytes at hd = 128, vgroup = 16
LANES = 16            # attention channels per cycle (scores and P x V); hd and vgroup are multiples of 16


class Unpacker(wiring.Component):
    """``start`` latches ``skip`` (items into the first beat) and ``count``; then the beats on ``i``
    come out as ``count`` items of ``e`` bits on ``o`` (the rest of the last beat is dropped), one
    item per cycle, no bubble between beats."""

    def __init__(self, W: int, e: int):
        self.W, self.e = W, e
        super().__init__({"start": In(1), "skip": In(range(W // e)), "count": In(32),
                          "i": In(stream.Signature(W)), "o": Out(stream.Signature(e)), "busy": Out(1)})

    def elaborate(self, platform):
        m = Module()
        n = self.W // self.e
        cur = Signal(self.W)
        have = Signal()
        ptr = Signal(range(n))
        rem = Signal(32)
        fire = self.o.valid & self.o.ready
        release = fire & ((ptr == n - 1) | (rem == 1))
        rem_after = Signal(32)
        m.d.comb += [rem_after.eq(rem - fire),
                     self.o.valid.eq(have & (rem != 0)), self.o.payload.eq(cur.word_select(ptr, self.e)),
                     self.i.ready.eq((~have | release) & (rem_after != 0)), self.busy.eq(rem != 0)]
        with m.If(self.start):
            m.d.sync += [rem.eq(self.count), ptr.eq(self.skip), have.eq(0)]
        with m.Else():
            with m.If(fire):
                m.d.sync += [rem.eq(rem - 1), ptr.eq(ptr + 1)]
            with m.If(release):
                m.d.sync += have.eq(0)
            with m.If(self.i.valid & self.i.ready):
                m.d.sync += [cur.eq(self.i.payload), have.eq(1)]
        return m


def _align64(x):
    return (x + 63) & ~63


class AttnUnit(Unit):
    WRITES_WEIGHTS = True       # KV appends go to the weight ports (the kernel wires ww_data* straight)
    FLAGS = isa.F_SPATTEN       # ATTN.spatten: see the module doc, "SpAtten"

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        a, b, d = self.fields("a", "b", "d")
        P, W, Wb, lgWb, WPB, lgWPB = cfg.weight_ports, self.W, self.Wb, self.lgWb, self.WPB, self.lgWPB
        H = cfg.max_hidden
        T = self.n_tokens

        # ---- cores
        m.submodules.rope = rope = RoPE(MAX_HD)
        m.submodules.kq = kq = KeyQuant()
        m.submodules.vq = vq = ValueQuant(MAX_HD)
        m.submodules.core = core = AttentionCore(MAX_HD, cfg.max_context, LANES)
        m.submodules.aq = aq = ActQuant(H)
        m.submodules.div = div = Divider(32, 32)
        m.submodules.wu = wu = Unpacker(W, 32)        # io (ctrl port) -> int32 words
        m.submodules.bu = bu = Unpacker(W, 8)         # weight ports -> bytes (constants)
        m.submodules.bw = bw = Unpacker(W, 64)        # weight ports -> 64-bit items (K/V areas: 16 codes each)

        def mem(name, shape, depth, reads=1, gran=None):
            mm_ = memory.Memory(shape=shape, depth=depth, init=[])
            m.submodules[name] = mm_
            wp = mm_.write_port(granularity=gran) if gran else mm_.write_port()
            return wp, [mm_.read_port(domain="comb") for _ in range(reads)]

        f_w, (f_r,) = mem("f_mem", 32, MAX_HD // 2)
        rk_w, (rk_r,) = mem("rk_mem", 32, MAX_HD)
        ks_w, (ks_r,) = mem("ks_mem", 8, MAX_HD)
        kz_w, (kz_r1, kz_r2) = mem("kz_mem", 4, MAX_HD, 2)
        km_w, (km_r,) = mem("km_mem", 16, MAX_HD)
        rec_depth = -(-(Wb - 1 + MAX_VREC) // Wb) + 1
        rec_w, (rec_r,) = mem("rec", W, rec_depth, 1, 8)
        gw_w, (gw_r,) = mem("gwords", 64, MAX_HD // 32)    # the group words of the V record being read, 2 per row
        out_depth = -(-(64 + H) // Wb) + 1
        out_w, (out_r,) = mem("obuf", W, out_depth, 1, 8)
        # SpAtten (ATTN.spatten): per slot of the layer a pruned flag + "appended by this instruction"
        # flag and the importance accumulated by this instruction (after the read-add the new row value);
        # per token the alive slots (list, for the probability tap) and their runs (start, length) for
        # the K/V bursts; per query head the stored importance and this instruction's sum of head norms
        NC = cfg.max_context
        nb_ = (NC + 1).bit_length()
        sp_w, (sp_r,) = mem("sp_flags", 2, NC)
        acc_w, (acc_r,) = mem("sp_acc", 64, NC)
        lst_w, (lst_r,) = mem("sp_list", nb_, NC)
        run_w, (run_r,) = mem("sp_runs", 2 * nb_, NC)
        MH = memmap.spatten_max_heads(cfg.max_hidden)
        himp_w, (himp_r,) = mem("sp_himp", 64, MH)
        hsum_w, (hsum_r,) = mem("sp_hsum", 64, MH)
        m.submodules.isq = isq = ISqrt(27)

        # ---- descriptor
        hdr = Signal(512)
        hw_ = {name: hdr[32 * i: 32 * i + 32] for i, name in enumerate(memmap.ATN_FIELDS)}
        Hq, Hkv, hd, S_, W_, slots = hw_["heads"], hw_["kv_heads"], hw_["head_dim"], hw_["sink"], hw_["window"], hw_["slots"]
        ring = hw_["ring"] != 0
        cache_rope = (hw_["rope_mode"] == memmap.ROPE_CACHE) & ring
        vg = hw_["vgroup"]
        sp_on = Signal()        # ATTN.spatten
        spt_off = Signal(32)
        shdr = Signal(512)
        sf = {name: shdr[32 * i: 32 * i + 32] for i, name in enumerate(memmap.SPT_FIELDS)}
        st_base = Signal(64)    # this layer's SpAtten state
        m.d.comb += st_base.eq(self.weights[0] + sf["state_off"] + hw_["layer"] * sf["layer_bytes"])
        hdead = Signal(MH)      # pruned query heads
        na = Signal(nb_)        # alive slots of the token (the core's n)
        nsa = Signal(nb_)       # ... of them sinks
        nruns = Signal(nb_)
        ri = Signal(nb_)        # run being read
        rs_, rl_ = Signal(nb_), Signal(nb_)     # run being built
        sq = Signal(56)         # head norm: sum of squares
        wi = Signal(32)         # row writer: item
        wk = Signal(range(W // 8 + 1))          # row writer: item within the beat
        wbuf = Signal(W)
        wstrb = Signal(Wb)
        S = Signal(32)          # effective sink count (0 for the linear cache)
        Wn = Signal(32)         # effective window
        m.d.comb += [S.eq(Mux(ring, S_, 0)), Wn.eq(Mux(ring, W_, slots))]
        width = Signal(32)
        m.d.comb += width.eq((Hq + (Hkv << 1)) * hd)
        src_stride = Signal(32)
        m.d.comb += src_stride.eq(((width << 2) + 63) & ~63)
        DQ = Signal(32)
        m.d.comb += DQ.eq(Hq * hd)
        dst_stride = Signal(32)
        m.d.comb += dst_stride.eq(64 + ((DQ + 63) & ~63))
        k_slot = Signal(32)
        v_slot = Signal(32)
        ngv = Signal(32)          # value groups per head (hd / vgroup)
        grp = Signal(32)          # query heads per KV head
        wa = Signal(32)           # V record: bytes of the group words, padded to 8
        m.d.comb += [wa.eq(((ngv + 1) >> 1) << 3), k_slot.eq(hd >> 1), v_slot.eq((hd >> 1) + wa)]
        nkc = Signal(32)
        m.d.comb += nkc.eq(Hkv * hd)
        off_ks = Signal(32)
        off_kz = Signal(32)
        off_km = Signal(32)
        off_ksh = Signal(32)
        m.d.comb += [off_ks.eq(_align64(nkc << 2)), off_kz.eq(off_ks + _align64(nkc)),
                     off_km.eq(off_kz + _align64(nkc)), off_ksh.eq(off_km + _align64(nkc << 1))]

        # ---- per-token / per-head state
        t = Signal(32)
        p = Signal(32)              # position of token t
        slot = Signal(32)           # its append slot
        n = Signal(32)              # kept tokens after the append
        h = Signal(16)
        hp = Signal(range(max(P, 2)))   # port of KV head h
        hl = Signal(16)             # local index on that port
        gi = Signal(16)             # query head within the group
        g = Signal(16)              # query head
        second = Signal()           # loading the cache-position query
        sec = Signal(3)             # constant section being loaded
        cnt = Signal(32)
        ci = Signal(32)
        nib = Signal(4)
        fi = Signal(range(MAX_HD + 1))      # RoPE frequency index
        cc = Signal(range(MAX_HD + 1))      # constant index (key quant / core)
        started = Signal()
        issued = Signal()
        js = Signal(32)             # V record (slot) being read
        ksh = Signal(8)

        weights = [self.weights[q] for q in range(P)]
        whp = Signal(64)
        for q in range(P):
            with m.If(hp == q):
                m.d.comb += whp.eq(weights[q])
        k_base = Signal(64)     # K area of head h
        v_base = Signal(64)
        m.d.comb += [k_base.eq(whp + hw_["k_off"] + hl * slots * k_slot),
                     v_base.eq(whp + hw_["v_off"] + hl * slots * v_slot)]
        src_row = Signal(64)
        m.d.comb += src_row.eq(self.io + b + t * src_stride)

        # weight-port read command / data (one port at a time: wsel)
        wsel = Signal(range(max(P, 2)))
        wcmd_valid, wcmd_addr, wcmd_beats = Signal(), Signal(64), Signal(32)
        for q in range(P):
            wc, wd = self.w_cmd[q], self.w_data[q]
            m.d.comb += [wc.payload.addr.eq(wcmd_addr), wc.payload.beats.eq(wcmd_beats)]
            with m.If(wsel == q):
                # both unpackers see the data; only the started one (count left) accepts it
                m.d.comb += [wc.valid.eq(wcmd_valid), bu.i.valid.eq(wd.valid), bu.i.payload.eq(wd.payload),
                             bw.i.valid.eq(wd.valid), bw.i.payload.eq(wd.payload),
                             wd.ready.eq(bu.i.ready | bw.i.ready)]
        wcmd_ready = Signal()
        for q in range(P):
            with m.If(wsel == q):
                m.d.comb += wcmd_ready.eq(self.w_cmd[q].ready)
        # weight-port write (port hp)
        ww_valid, ww_addr, ww_beats = Signal(), Signal(64), Signal(32)
        wwd_valid, wwd_data, wwd_strb = Signal(), Signal(W), Signal(Wb)
        ww_ready, wwd_ready, ww_busy = Signal(), Signal(), Signal()
        for q in range(P):
            wc, wd = self.ww_cmd[q], self.ww_data[q]
            # payloads go to every port (only the selected one sees valid): no 512-bit gate per port
            m.d.comb += [wc.payload.addr.eq(ww_addr), wc.payload.beats.eq(ww_beats),
                         wd.payload.data.eq(wwd_data), wd.payload.strb.eq(wwd_strb)]
            with m.If(hp == q):
                m.d.comb += [wc.valid.eq(ww_valid), ww_ready.eq(wc.ready), wd.valid.eq(wwd_valid),
                             wwd_ready.eq(wd.ready), ww_busy.eq(self.ww_busy[q])]
        # io reads into the word unpacker
        m.d.comb += [wu.i.valid.eq(self.rd_data.valid), wu.i.payload.eq(self.rd_data.payload),
                     self.rd_data.ready.eq(wu.i.ready)]

        io_sites = []

        def io_read(addr, count):
            """Issue an io read of *count* int32 words at byte address *addr* (4-byte aligned) and start
            the word unpacker; returns the handshake condition."""
            lo = Signal(lgWb + 1, name=f"io_lo{len(io_sites)}")
            io_sites.append(lo)
            m.d.comb += lo.eq(addr[:lgWb])
            m.d.comb += [self.rd_cmd.valid.eq(1), self.rd_cmd.payload.addr.eq(addr & ~(Wb - 1)),
                         self.rd_cmd.payload.beats.eq((lo + (count << 2) + Wb - 1) >> lgWb),
                         wu.skip.eq(addr[2:lgWb] if lgWPB else 0), wu.count.eq(count),
                         wu.start.eq(self.rd_cmd.ready)]
            return self.rd_cmd.ready

        def w_read(addr, count, words=False):
            """Issue a read of *count* bytes at *addr* on port wsel into the byte unpacker (or, with
            *words*, into the 64-bit item unpacker: addr and count multiples of 8)."""
            lo = addr[:lgWb]
            m.d.comb += [wcmd_valid.eq(1), wcmd_addr.eq(addr & ~(Wb - 1)),
                         wcmd_beats.eq((lo + count + Wb - 1) >> lgWb)]
            if words:
                m.d.comb += [bw.skip.eq(lo >> 3), bw.count.eq(count >> 3), bw.start.eq(wcmd_ready)]
            else:
                m.d.comb += [bu.skip.eq(lo), bu.count.eq(count), bu.start.eq(wcmd_ready)]
            return wcmd_ready

        # the K/V areas are read as runs of consecutive slots: one run 0..n-1, or under SpAtten the runs of alive slots
        r_start, r_len, r_cnt = Signal(nb_), Signal(nb_), Signal(nb_)
        m.d.comb += [run_r.addr.eq(ri), r_start.eq(Mux(sp_on, run_r.data[:nb_], 0)),
                     r_len.eq(Mux(sp_on, run_r.data[nb_:], n)), r_cnt.eq(Mux(sp_on, nruns, 1))]

        def imp_add(x, y):
            """numerics.imp_add: the 64-bit wrapping sum, then saturated at IMP_MAX (unsigned)."""
            s64 = Signal(64, name=f"impsum{len(imp_sites)}")
            imp_sites.append(s64)
            m.d.comb += s64.eq(x + y)
            return Mux(s64[63], (1 << 63) - 1, s64)
        imp_sites = []

        # probability tap (default: the core's PCOL): importance of the slot behind alive index pt_idx
        m.d.comb += [lst_r.addr.eq(core.pt_idx), acc_r.addr.eq(lst_r.data), acc_w.addr.eq(lst_r.data),
                     acc_w.data.eq(acc_r.data + core.pt_val), acc_w.en.eq(core.pt_valid & sp_on)]

        # RoPE frequencies / constants
        m.d.comb += [rope.n.eq(hd), f_r.addr.eq(fi), rope.f.payload.eq(f_r.data),
                     rk_r.addr.eq(cc), ks_r.addr.eq(cc), kz_r1.addr.eq(cc), km_r.addr.eq(cc), kz_r2.addr.eq(cc),
                     kq.c.payload.eq(Cat(rk_r.data, ks_r.data, kz_r1.data)),
                     core.c.payload.eq(Cat(km_r.data, kz_r2.data)),
                     vq.group.eq(vg), aq.n.eq(DQ),
                     core.n.eq(Mux(sp_on, na, n)), core.ns.eq(Mux(sp_on, nsa, Mux(ring, Mux(n < S, n, S), 0))),
                     core.remap.eq(cache_rope),
                     core.hd.eq(hd), core.ksh.eq(ksh)]
        with m.If(rope.f.valid & rope.f.ready):
            m.d.sync += fi.eq(fi + 1)

        def rope_from_io():
            """io words -> RoPE, frequencies from f_mem (KAPP and QLOAD)."""
            m.d.comb += [rope.i.valid.eq(wu.o.valid), rope.i.payload.eq(wu.o.payload), wu.o.ready.eq(rope.i.ready),
                         rope.f.valid.eq(1)]

        # constant loads: byte assembler
        esz = Signal(3)
        bsel = Signal(2)
        acc = Signal(32)
        ei = Signal(range(MAX_HD + 1))
        full = Signal(32)
        m.d.comb += full.eq(acc | (bu.o.payload << (bsel << 3)))

        # record buffer writes (K/V records at the target's in-beat offset)
        rlo = Signal(lgWb + 1)
        rlen = Signal(32)
        wbeat = Signal(32)

        def rec_byte(byte_index, value, en):
            ba = Signal(32, name=f"rec_ba_{len(rec_sites)}")
            m.d.comb += ba.eq(rlo + byte_index)
            rec_sites.append(ba)
            m.d.comb += [rec_w.addr.eq(ba >> lgWb), rec_w.data.eq(value.replicate(Wb)),
                         rec_w.en.eq(Mux(en, Const(1, Wb) << ba[:lgWb], 0))]

        rec_sites = []

        spatten = (_fields(self.word)["flags"] & isa.F_SPATTEN) != 0
        with self.fsm(m, "BEGIN", on_start=[cnt.eq(0), sp_on.eq(spatten)]):
            with m.State("BEGIN"):
                with m.If((T == 0) | (T > cfg.max_prefill)):
                    self.end(m, regmap.STATUS_SHAPE)
                with m.Else():
                    m.next = "DESC"
            with m.State("DESC"):
                m.d.comb += [self.w_cmd[0].valid.eq(1), self.w_cmd[0].payload.addr.eq(self.weights[0] + d),
                             self.w_cmd[0].payload.beats.eq(64 // Wb)]
                with m.If(self.w_cmd[0].ready):
                    m.next = "DESC_RX"
            with m.State("DESC_RX"):
                m.d.comb += self.w_data[0].ready.eq(1)
                with m.If(self.w_data[0].valid):
                    m.d.sync += [hdr.word_select(cnt[:max(1, (64 // Wb - 1).bit_length())], W).eq(self.w_data[0].payload)
                                 if 64 // Wb > 1 else hdr.eq(self.w_data[0].payload), cnt.eq(cnt + 1)]
                    with m.If(cnt == 64 // Wb - 1):
                        m.next = "DESC_CHECK"
            with m.State("DESC_CHECK"):
                with m.If(hw_["magic"] != memmap.MAGIC_ATN):
                    self.end(m, regmap.STATUS_ADDR_RANGE)
                with m.Elif((Hkv == 0) | (vg == 0) | (hw_["kv_bits"] != 4)):
                    self.end(m, regmap.STATUS_SHAPE)
                with m.Else():
                    m.d.comb += [div.start.eq(1), div.num.eq(Hq), div.den.eq(Hkv)]
                    m.next = "DIV_G"
            with m.State("DIV_G"):
                with m.If(~div.busy):
                    with m.If(div.rem != 0):
                        self.end(m, regmap.STATUS_SHAPE)
                    with m.Else():
                        m.d.sync += grp.eq(div.quo)
                        m.next = "DIV_V0"
            with m.State("DIV_V0"):
                m.d.comb += [div.start.eq(1), div.num.eq(hd), div.den.eq(vg)]
                m.next = "DIV_V"
            with m.State("DIV_V"):
                with m.If(~div.busy):
                    m.d.sync += ngv.eq(div.quo)
                    bad_shape = ((div.rem != 0) | hd[0] | (DQ > H) | (Hq == 0)
                                 | (hd == 0) | (hd > MAX_HD) | (hd[:4] != 0) | (vg < 16) | (vg[:4] != 0))
                    bad_region = ((slots == 0) | (slots > cfg.max_context)
                                  | (ring & ((S_ + W_ != slots) | (W_ == 0))))
                    with m.If(bad_shape):
                        self.end(m, regmap.STATUS_SHAPE)
                    with m.Elif(bad_region):
                        self.end(m, regmap.STATUS_KV_REGION)
                    with m.Elif(~ring & ((Cat(self.position, Const(0, 1)) + T) > slots)):
                        self.end(m, regmap.STATUS_POSITION)
                    with m.Else():
                        m.next = "ADDR_CHECK"
            with m.State("ADDR_CHECK"):
                with m.If(_end64(b, T * src_stride) | _end64(a, T * dst_stride) | (b[:2] != 0)):
                    self.end(m, regmap.STATUS_ADDR_RANGE)
                with m.Else():
                    m.d.sync += [t.eq(0), sec.eq(0), esz.eq(4), bsel.eq(0), acc.eq(0), ei.eq(0), wsel.eq(0), cnt.eq(0)]
                    m.next = "CONST_CMD"
                    with m.If(sp_on):
                        m.next = "SX_CMD"

            # ---- SpAtten: descriptor word 16 -> the SpAtten descriptor -> checks -> this layer's state
            with m.State("SX_CMD"):
                m.d.comb += [self.w_cmd[0].valid.eq(1), self.w_cmd[0].payload.addr.eq(self.weights[0] + d + 64),
                             self.w_cmd[0].payload.beats.eq(1)]
                with m.If(self.w_cmd[0].ready):
                    m.next = "SX_RX"
            with m.State("SX_RX"):
                m.d.comb += self.w_data[0].ready.eq(1)
                with m.If(self.w_data[0].valid):
                    m.d.sync += spt_off.eq(self.w_data[0].payload[:32])
                    m.next = "SPT_CMD"
            with m.State("SPT_CMD"):
                with m.If(spt_off[:6] != 0):
                    self.end(m, regmap.STATUS_SHAPE)
                with m.Else():
                    m.d.comb += [self.w_cmd[0].valid.eq(1), self.w_cmd[0].payload.addr.eq(self.weights[0] + spt_off),
                                 self.w_cmd[0].payload.beats.eq(64 // Wb)]
                    with m.If(self.w_cmd[0].ready):
                        m.next = "SPT_RX"
            with m.State("SPT_RX"):
                m.d.comb += self.w_data[0].ready.eq(1)
                with m.If(self.w_data[0].valid):
                    m.d.sync += [shdr.word_select(cnt[:max(1, (64 // Wb - 1).bit_length())], W).eq(self.w_data[0].payload)
                                 if 64 // Wb > 1 else shdr.eq(self.w_data[0].payload), cnt.eq(cnt + 1)]
                    with m.If(cnt == 64 // Wb - 1):
                        m.next = "SPT_CHECK"
            with m.State("SPT_CHECK"):
                L_ = sf["layers"]
                aligned = ((sf["state_off"] | sf["layer_bytes"] | sf["imp_off"] | sf["dead_off"] | sf["himp_off"]
                            | sf["hdead_off"])[:6] == 0)
                with m.If(sf["magic"] != memmap.MAGIC_SPT):
                    self.end(m, regmap.STATUS_ADDR_RANGE)
                with m.Elif((L_ == 0) | (L_ > cfg.max_layers) | (sf["slots"] == 0) | (sf["slots"] > cfg.max_context)
                            | (sf["heads"] == 0) | (sf["heads"] > MH) | (sf["start_layer"] >= L_) | ~aligned
                            | (hw_["layer"] >= L_) | (sf["slots"] != slots) | (sf["heads"] != Hq)):
                    self.end(m, regmap.STATUS_SHAPE)
                with m.Elif(_end64(sf["state_off"], (hw_["layer"] + 1) * sf["layer_bytes"])):
                    self.end(m, regmap.STATUS_KV_REGION)
                with m.Else():
                    m.d.sync += ci.eq(0)
                    m.next = "SINIT0"
            with m.State("SINIT0"):
                with m.If(w_read(st_base + sf["dead_off"], slots)):
                    m.next = "SINIT"
            with m.State("SINIT"):
                # pruned flags in, appended flags and importance sums cleared
                m.d.comb += [bu.o.ready.eq(1), sp_w.addr.eq(ci), sp_w.data.eq(bu.o.payload != 0), sp_w.en.eq(bu.o.valid),
                             acc_w.addr.eq(ci), acc_w.data.eq(0), acc_w.en.eq(bu.o.valid)]
                with m.If(bu.o.valid):
                    m.d.sync += ci.eq(ci + 1)
                with m.If(~bu.busy):
                    m.d.sync += ci.eq(0)
                    with m.If(self.position == 0):      # a new sequence: every head alive, importance from zero
                        m.d.sync += hdead.eq(0)
                        m.next = "HCLR"
                    with m.Else():
                        m.next = "HDEAD0"
            with m.State("HCLR"):
                m.d.comb += [himp_w.addr.eq(ci), himp_w.data.eq(0), himp_w.en.eq(1),
                             hsum_w.addr.eq(ci), hsum_w.data.eq(0), hsum_w.en.eq(1)]
                m.d.sync += ci.eq(ci + 1)
                with m.If(ci + 1 == Hq):
                    m.next = "CONST_CMD"
            with m.State("HDEAD0"):
                with m.If(w_read(st_base + sf["hdead_off"], Hq)):
                    m.next = "HDEAD"
            with m.State("HDEAD"):
                m.d.comb += bu.o.ready.eq(1)
                with m.If(bu.o.valid):
                    m.d.sync += [hdead.bit_select(ci[:MH.bit_length()], 1).eq(bu.o.payload != 0), ci.eq(ci + 1)]
                with m.If(~bu.busy):
                    m.d.sync += ci.eq(0)
                    m.next = "HIMP0"
            with m.State("HIMP0"):
                with m.If(w_read(st_base + sf["himp_off"], Hq << 3, words=True)):
                    m.next = "HIMP"
            with m.State("HIMP"):
                m.d.comb += [bw.o.ready.eq(1), himp_w.addr.eq(ci), himp_w.data.eq(bw.o.payload), himp_w.en.eq(bw.o.valid),
                             hsum_w.addr.eq(ci), hsum_w.data.eq(0), hsum_w.en.eq(bw.o.valid)]
                with m.If(bw.o.valid):
                    m.d.sync += ci.eq(ci + 1)
                with m.If(~bw.busy):
                    m.d.sync += ci.eq(0)
                    m.next = "CONST_CMD"

            # ---- constant loads: sec 0 = RoPE frequencies (once), 1..5 = RK, KS, KZ, KM, KSH of head h
            with m.State("CONST_CMD"):
                kc = self.weights[0] + hw_["kconst_off"]
                addr = Signal(64)
                count = Signal(32)
                with m.Switch(sec):
                    with m.Case(0):
                        m.d.comb += [addr.eq(self.weights[0] + hw_["rope_off"]), count.eq(hd << 1)]
                    with m.Case(1):
                        m.d.comb += [addr.eq(kc + ((h * hd) << 2)), count.eq(hd << 2)]
                    with m.Case(2):
                        m.d.comb += [addr.eq(kc + off_ks + h * hd), count.eq(hd)]
                    with m.Case(3):
                        m.d.comb += [addr.eq(kc + off_kz + h * hd), count.eq(hd)]
                    with m.Case(4):
                        m.d.comb += [addr.eq(kc + off_km + ((h * hd) << 1)), count.eq(hd << 1)]
                    with m.Case(5):
                        m.d.comb += [addr.eq(kc + off_ksh + h), count.eq(1)]
                with m.If(w_read(addr, count)):
                    m.next = "CONST_RX"
            with m.State("CONST_RX"):
                m.d.comb += bu.o.ready.eq(1)
                with m.If(bu.o.valid):
                    with m.If(bsel == esz - 1):
                        m.d.sync += [acc.eq(0), bsel.eq(0), ei.eq(ei + 1)]
                        with m.Switch(sec):
                            with m.Case(0):
                                m.d.comb += [f_w.addr.eq(ei), f_w.data.eq(full), f_w.en.eq(1)]
                            with m.Case(1):
                                m.d.comb += [rk_w.addr.eq(ei), rk_w.data.eq(full), rk_w.en.eq(1)]
                            with m.Case(2):
                                m.d.comb += [ks_w.addr.eq(ei), ks_w.data.eq(full), ks_w.en.eq(1)]
                            with m.Case(3):
                                m.d.comb += [kz_w.addr.eq(ei), kz_w.data.eq(full), kz_w.en.eq(1)]
                            with m.Case(4):
                                m.d.comb += [km_w.addr.eq(ei), km_w.data.eq(full), km_w.en.eq(1)]
                            with m.Case(5):
                                m.d.sync += ksh.eq(full)
                    with m.Else():
                        m.d.sync += [acc.eq(full), bsel.eq(bsel + 1)]
                with m.If(~bu.busy):
                    m.d.sync += [ei.eq(0), bsel.eq(0), acc.eq(0), sec.eq(sec + 1),
                                 esz.eq(Mux(sec == 1, 1, Mux(sec == 2, 1, Mux(sec == 3, 2, 1))))]
                    with m.If(sec == 0):
                        m.next = "TOK"
                    with m.Elif(sec == 5):
                        m.next = "KAPP0"
                    with m.Else():
                        m.next = "CONST_CMD"

            # ---- token start: position, append slot, kept count
            with m.State("TOK"):
                pt = self.position + t
                m.d.sync += [p.eq(pt), h.eq(0), hp.eq(0), hl.eq(0), g.eq(0)]
                m.d.comb += aq.start.eq(1)
                with m.If(ring & (pt >= S)):
                    m.d.comb += [div.start.eq(1), div.num.eq(pt - S), div.den.eq(Wn)]
                    m.next = "SLOT"
                with m.Else():
                    m.d.sync += slot.eq(pt)
                    m.next = "TOK2"
            with m.State("SLOT"):
                with m.If(~div.busy):
                    m.d.sync += slot.eq(S + div.rem)
                    m.next = "TOK2"
            with m.State("TOK2"):
                m.d.sync += [n.eq(Mux(p + 1 < slots, p + 1, slots)), sec.eq(1), esz.eq(4), wsel.eq(0)]
                m.next = "CONST_CMD"
                with m.If(sp_on):
                    # the appended slot: alive, and its importance restarts (the evicted token's is forgotten)
                    m.d.comb += [sp_w.addr.eq(slot), sp_w.data.eq(0b10), sp_w.en.eq(1),
                                 acc_w.addr.eq(slot), acc_w.data.eq(0), acc_w.en.eq(1)]
                    m.d.sync += [ci.eq(0), na.eq(0), nsa.eq(0), nruns.eq(0), rl_.eq(0)]
                    m.next = "BUILD"
            with m.State("BUILD"):
                # slots 0..n-1 in order: the alive ones into the list, consecutive ones into runs
                alive = ~sp_r.data[0]
                m.d.comb += sp_r.addr.eq(ci)
                with m.If(alive):
                    m.d.comb += [lst_w.addr.eq(na), lst_w.data.eq(ci), lst_w.en.eq(1)]
                    m.d.sync += [na.eq(na + 1), nsa.eq(nsa + (ci < S))]
                    with m.If((rl_ != 0) & (rs_ + rl_ == ci)):
                        m.d.sync += rl_.eq(rl_ + 1)
                    with m.Else():
                        with m.If(rl_ != 0):
                            m.d.comb += [run_w.addr.eq(nruns), run_w.data.eq(Cat(rs_, rl_)), run_w.en.eq(1)]
                            m.d.sync += nruns.eq(nruns + 1)
                        m.d.sync += [rs_.eq(ci), rl_.eq(1)]
                m.d.sync += ci.eq(ci + 1)
                with m.If(ci + 1 == n):
                    m.next = "BUILD_END"
            with m.State("BUILD_END"):
                m.d.comb += [run_w.addr.eq(nruns), run_w.data.eq(Cat(rs_, rl_)), run_w.en.eq(1)]   # rl_ >= 1: p's own slot
                m.d.sync += [nruns.eq(nruns + 1), ci.eq(0)]
                m.next = "CONST_CMD"

            # ---- key append: k_h -> RoPE(p) -> key quant -> nibbles -> record -> write
            with m.State("KAPP0"):
                m.d.sync += [rlo.eq((k_base + slot * k_slot)[:lgWb]), rlen.eq(k_slot)]
                with m.If(io_read(src_row + ((Hq + h) * hd << 2), hd)):
                    m.d.comb += [rope.start.eq(1), rope.pos.eq(p)]
                    m.d.sync += [fi.eq(0), cc.eq(0), ci.eq(0)]
                    m.next = "KAPP"
            with m.State("KAPP"):
                rope_from_io()
                m.d.comb += [kq.i.valid.eq(rope.o.valid), kq.i.payload.eq(rope.o.payload), rope.o.ready.eq(kq.i.ready),
                             kq.c.valid.eq(1), kq.o.ready.eq(1)]
                with m.If(kq.i.valid & kq.i.ready):
                    m.d.sync += cc.eq(cc + 1)
                with m.If(kq.o.valid):
                    m.d.sync += ci.eq(ci + 1)
                    with m.If(~ci[0]):
                        m.d.sync += nib.eq(kq.o.payload)
                    rec_byte(ci >> 1, Cat(nib, kq.o.payload), ci[0])
                    with m.If(ci + 1 == hd):
                        m.d.sync += [wbeat.eq(0), issued.eq(0)]
                        m.next = "KWRITE"
            # ---- record write (K then V)
            for name, base, nxt in (("KWRITE", k_base + slot * k_slot, "VAPP0"),
                                    ("VWRITE", v_base + slot * v_slot, "WSYNC")):
                with m.State(name):
                    nbeats = Signal(32, name=f"{name.lower()}_beats")
                    m.d.comb += nbeats.eq((rlo + rlen + Wb - 1) >> lgWb)
                    m.d.comb += [ww_valid.eq(~issued), ww_addr.eq(base & ~(Wb - 1)), ww_beats.eq(nbeats)]
                    with m.If(ww_valid & ww_ready):
                        m.d.sync += issued.eq(1)
                    lo = Signal(32, name=f"{name.lower()}_lo")
                    m.d.comb += lo.eq(wbeat << lgWb)
                    bits = []
                    for j in range(Wb):
                        pos = lo + j
                        bits.append((pos >= rlo) & (pos < rlo + rlen))
                    m.d.comb += [rec_r.addr.eq(wbeat), wwd_valid.eq(issued & (wbeat < nbeats)), wwd_data.eq(rec_r.data),
                                 wwd_strb.eq(Cat(*bits))]
                    with m.If(wwd_valid & wwd_ready):
                        m.d.sync += wbeat.eq(wbeat + 1)
                    with m.If(issued & (wbeat == nbeats)):
                        m.d.sync += started.eq(0)
                        m.next = nxt
            # ---- value append: v_h -> value quant -> codes + group words -> record -> write
            with m.State("VAPP0"):
                m.d.sync += [rlo.eq((v_base + slot * v_slot)[:lgWb]), rlen.eq(v_slot)]
                with m.If(io_read(src_row + ((Hq + Hkv + h) * hd << 2), hd)):
                    m.d.sync += [ci.eq(0), cnt.eq(0), cc.eq(0)]
                    m.next = "VAPP"
            with m.State("VAPP"):
                # cnt: codes of the current group; cc: group index; ci: channel
                m.d.comb += [vq.i.valid.eq(wu.o.valid), vq.i.payload.eq(wu.o.payload), wu.o.ready.eq(vq.i.ready),
                             vq.o.ready.eq(1)]
                with m.If(vq.o.valid):
                    with m.If(cnt == vg):
                        rec_word_ba = Signal(32)
                        m.d.comb += rec_word_ba.eq(rlo + (cc << 2))
                        m.d.comb += [rec_w.addr.eq(rec_word_ba >> lgWb), rec_w.data.eq(vq.o.payload.replicate(WPB)),
                                     rec_w.en.eq(Const(0xF, Wb) << rec_word_ba[:lgWb])]
                        m.d.sync += [cnt.eq(0), cc.eq(cc + 1)]
                        with m.If(cc + 1 == ngv):
                            m.d.sync += [wbeat.eq(0), issued.eq(0)]
                            m.next = "VPAD"
                    with m.Else():
                        m.d.sync += [cnt.eq(cnt + 1), ci.eq(ci + 1)]
                        with m.If(~ci[0]):
                            m.d.sync += nib.eq(vq.o.payload[:4])
                        rec_byte(wa + (ci >> 1), Cat(nib, vq.o.payload[:4]), ci[0])
            with m.State("VPAD"):
                # an odd number of group words: the 4 pad bytes before the codes are written as zeros
                pad_ba = Signal(32)
                m.d.comb += pad_ba.eq(rlo + (ngv << 2))
                m.d.comb += [rec_w.addr.eq(pad_ba >> lgWb), rec_w.data.eq(0),
                             rec_w.en.eq(Mux(ngv[0], Const(0xF, Wb) << pad_ba[:lgWb], 0))]
                m.next = "VWRITE"
            with m.State("WSYNC"):
                # the K/V records must be in memory before the areas are read back
                m.d.sync += started.eq(1)
                with m.If(started & ~ww_busy):
                    m.d.sync += [gi.eq(0), second.eq(0)]
                    m.next = "Q0"

            # ---- query head g: q -> RoPE -> core (twice under the cache-position rule)
            with m.State("Q0"):
                m.d.sync += sq.eq(0)
                with m.If(sp_on & hdead.bit_select(g[:MH.bit_length()], 1)):
                    m.d.sync += ci.eq(0)
                    m.next = "QZERO"
                with m.Else():
                    with m.If(io_read(src_row + ((g * hd) << 2), hd)):
                        m.d.comb += [rope.start.eq(1), rope.pos.eq(Mux(second, Mux(p < slots - 1, p, slots - 1), p)),
                                     core.start.eq(~second)]
                        m.d.sync += [fi.eq(0), cc.eq(0), ci.eq(0)]
                        m.next = "QLOAD"
            with m.State("QLOAD"):
                rope_from_io()
                m.d.comb += [core.q.valid.eq(rope.o.valid), core.q.payload.eq(rope.o.payload), rope.o.ready.eq(core.q.ready),
                             core.c.valid.eq(rope.o.valid)]
                with m.If(core.q.valid & core.q.ready):
                    m.d.sync += [cc.eq(cc + 1), ci.eq(ci + 1)]
                    with m.If(ci + 1 == hd):
                        with m.If(cache_rope & ~second):
                            m.d.sync += second.eq(1)
                            m.next = "Q0"
                        with m.Else():
                            m.d.sync += [second.eq(0), wsel.eq(hp), ri.eq(0)]
                            m.next = "KRD0"
            with m.State("KRD0"):
                with m.If(w_read(k_base + r_start * k_slot, r_len * k_slot, words=True)):
                    m.next = "KRD"
            with m.State("KRD"):
                # 64-bit items = 16 codes each (channel order, low nibble first) -> core.k, LANES per cycle
                m.d.comb += [core.k.valid.eq(bw.o.valid), core.k.payload.eq(bw.o.payload), bw.o.ready.eq(core.k.ready)]
                with m.If(~bw.busy):
                    with m.If(ri + 1 < r_cnt):
                        m.d.sync += ri.eq(ri + 1)
                        m.next = "KRD0"
                    with m.Else():
                        m.d.sync += ri.eq(0)
                        m.next = "VRD0"
            with m.State("VRD0"):
                with m.If(w_read(v_base + r_start * v_slot, r_len * v_slot, words=True)):
                    m.d.sync += [cnt.eq(0), ci.eq(0), cc.eq(0), js.eq(0)]
                    m.next = "VWORDS"
            with m.State("VWORDS"):
                # the slot's V record starts with its hd / vgroup group words (two per item, padded to an
                # even count): keep them in gwords
                m.d.comb += [bw.o.ready.eq(1), gw_w.addr.eq(cc), gw_w.data.eq(bw.o.payload), gw_w.en.eq(bw.o.valid)]
                with m.If(bw.o.valid):
                    m.d.sync += cc.eq(cc + 1)
                    with m.If((cc + 1) << 1 >= ngv):
                        m.d.sync += [cc.eq(0), cnt.eq(0), ci.eq(0)]
                        m.next = "VCODES"
            with m.State("VCODES"):
                # then its codes, 16 per item, straight into the core with their group's word
                gword = Signal(32)
                m.d.comb += [gw_r.addr.eq(cc >> 1), gword.eq(Mux(cc[0], gw_r.data[32:], gw_r.data[:32]))]
                m.d.comb += [core.v.valid.eq(bw.o.valid), bw.o.ready.eq(core.v.ready),
                             core.v.payload.eq(Cat(*(Cat(bw.o.payload[4 * ln: 4 * ln + 4], gword)
                                                     for ln in range(LANES))))]
                with m.If(core.v.valid & core.v.ready):
                    m.d.sync += [ci.eq(ci + LANES), cnt.eq(cnt + LANES)]
                    with m.If(cnt + LANES == vg):
                        m.d.sync += [cnt.eq(0), cc.eq(cc + 1)]
                    with m.If(ci + LANES == hd):
                        m.d.sync += [cnt.eq(0), ci.eq(0), cc.eq(0), js.eq(js + 1)]
                        with m.If(js + 1 != r_len):
                            m.next = "VWORDS"
                        with m.Elif(ri + 1 < r_cnt):
                            m.d.sync += ri.eq(ri + 1)
                            m.next = "VRD0"
                        with m.Else():
                            m.next = "QOUT"
            def next_head():
                m.d.sync += g.eq(g + 1)
                with m.If(gi + 1 < grp):
                    m.d.sync += [gi.eq(gi + 1), ci.eq(0)]
                    m.next = "Q0"
                with m.Elif(h + 1 < Hkv):
                    m.d.sync += [h.eq(h + 1), hp.eq(Mux(hp == P - 1, 0, hp + 1)), hl.eq(hl + (hp == P - 1)),
                                 sec.eq(1), esz.eq(4), wsel.eq(0)]
                    m.next = "CONST_CMD"
                with m.Else():
                    m.d.sync += [ci.eq(0)]
                    m.next = "RESULT"

            with m.State("QOUT"):
                m.d.comb += [aq.i.valid.eq(core.o.valid), aq.i.payload.eq(core.o.payload), core.o.ready.eq(aq.i.ready)]
                r8 = Signal(signed(25))
                sq_next = Signal(56)
                m.d.comb += [r8.eq(rsr_c(core.o.payload, 8)), sq_next.eq(sq + r8 * r8)]
                with m.If(core.o.valid & core.o.ready):
                    m.d.sync += [ci.eq(ci + 1), sq.eq(sq_next)]
                    with m.If(ci + 1 == hd):
                        with m.If(sp_on):
                            m.next = "HNORM0"
                        with m.Else():
                            next_head()
            with m.State("HNORM0"):
                # head importance: isqrt of the sum of squares of round(o / 2**8) (numerics.head_norm)
                m.d.comb += [isq.start.eq(1), isq.v.eq(sq)]
                m.next = "HNORM"
            with m.State("HNORM"):
                m.d.comb += [hsum_r.addr.eq(g), hsum_w.addr.eq(g), hsum_w.data.eq(hsum_r.data + isq.root)]
                with m.If(~isq.busy):
                    m.d.comb += hsum_w.en.eq(1)
                    next_head()
            with m.State("QZERO"):
                # a pruned head: output 0, no K/V read, no importance
                m.d.comb += [aq.i.valid.eq(1), aq.i.payload.eq(0)]
                with m.If(aq.i.ready):
                    m.d.sync += ci.eq(ci + 1)
                    with m.If(ci + 1 == hd):
                        next_head()

            # ---- quantized output row -> obuf -> io
            with m.State("RESULT"):
                m.d.comb += aq.o.ready.eq(1)
                byte = Signal(32)
                m.d.comb += byte.eq(Mux(ci < DQ, 64 + ci, 0))
                with m.If(ci < DQ):
                    m.d.comb += [out_w.data.eq(aq.o.payload[:8].replicate(Wb)),
                                 out_w.en.eq(Mux(aq.o.valid, Const(1, Wb) << byte[:lgWb], 0))]
                with m.Else():
                    m.d.comb += [out_w.data.eq(aq.o.payload.replicate(WPB)), out_w.en.eq(Mux(aq.o.valid, 0xF, 0))]
                m.d.comb += out_w.addr.eq(byte >> lgWb)
                with m.If(aq.o.valid):
                    m.d.sync += ci.eq(ci + 1)
                    with m.If(ci == DQ):
                        m.d.sync += [wbeat.eq(0), issued.eq(0)]
                        m.next = "OWRITE"
            with m.State("OWRITE"):
                ob = Signal(32)
                m.d.comb += ob.eq((64 + DQ + Wb - 1) >> lgWb)
                m.d.comb += [self.wr_cmd.valid.eq(~issued), self.wr_cmd.payload.addr.eq(self.io + a + t * dst_stride),
                             self.wr_cmd.payload.beats.eq(ob)]
                with m.If(self.wr_cmd.valid & self.wr_cmd.ready):
                    m.d.sync += issued.eq(1)
                lo = Signal(32)
                m.d.comb += lo.eq(wbeat << lgWb)
                bits = []
                for j in range(Wb):
                    pos = lo + j
                    bits.append((pos < 4) | ((pos >= 64) & (pos < 64 + DQ)))
                m.d.comb += [out_r.addr.eq(wbeat), self.wr_data.valid.eq(issued & (wbeat < ob)),
                             self.wr_data.payload.data.eq(out_r.data), self.wr_data.payload.strb.eq(Cat(*bits))]
                with m.If(self.wr_data.valid & self.wr_data.ready):
                    m.d.sync += wbeat.eq(wbeat + 1)
                with m.If(issued & (wbeat == ob)):
                    m.d.sync += started.eq(0)
                    m.next = "OWAIT"
            with m.State("OWAIT"):
                m.d.sync += started.eq(1)
                with m.If(started & ~self.wr_busy):
                    with m.If(t + 1 >= T):
                        m.d.sync += [ci.eq(0), hp.eq(0), wsel.eq(0)]
                        m.next = "DONE"
                        with m.If(sp_on):
                            m.next = "WB_IMP0"
                    with m.Else():
                        m.d.sync += t.eq(t + 1)
                        m.next = "TOK"
            # ---- SpAtten state write-back (port 0): token importance (a slot appended by this instruction
            # takes its new sum; an older one held before the block accumulates, saturating; others keep
            # their bytes), the appended slots' pruned flags cleared, head importance, head flags at position 0
            with m.State("WB_IMP0"):
                with m.If(w_read(st_base + sf["imp_off"], slots << 3, words=True)):
                    m.next = "WB_IMP"
            with m.State("WB_IMP"):
                old = bw.o.payload
                m.d.comb += [bw.o.ready.eq(1), sp_r.addr.eq(ci), acc_r.addr.eq(ci), acc_w.addr.eq(ci),
                             acc_w.data.eq(Mux(sp_r.data[1], acc_r.data, Mux(ci < self.position, imp_add(old, acc_r.data), old))),
                             acc_w.en.eq(bw.o.valid)]
                with m.If(bw.o.valid):
                    m.d.sync += ci.eq(ci + 1)
                with m.If(~bw.busy):
                    m.next = "WB_IMP_CMD"

            def row_writer(name, addr, count, e, item, nxt):
                """Write *count* items of *e* bits (item(wi) -> (value, strobe)) to *addr* (beat-aligned)."""
                per = W // e
                beats = Signal(32, name=f"{name.lower()}_beats")
                m.d.comb += beats.eq(((count * (e // 8)) + Wb - 1) >> lgWb)
                with m.State(f"{name}_CMD"):
                    m.d.comb += [ww_valid.eq(1), ww_addr.eq(addr), ww_beats.eq(beats)]
                    with m.If(ww_ready):
                        m.d.sync += [wi.eq(0), wk.eq(0), wbuf.eq(0), wstrb.eq(0)]
                        m.next = f"{name}_FILL"
                with m.State(f"{name}_FILL"):
                    val, stb = item(wi)
                    m.d.sync += [wbuf.word_select(wk[:max(1, (per - 1).bit_length())], e).eq(val),
                                 wstrb.word_select(wk[:max(1, (per - 1).bit_length())], e // 8).eq(Mux(stb, (1 << (e // 8)) - 1, 0)),
                                 wi.eq(wi + 1), wk.eq(wk + 1)]
                    with m.If((wk + 1 == per) | (wi + 1 == count)):
                        m.next = f"{name}_SEND"
                with m.State(f"{name}_SEND"):
                    m.d.comb += [wwd_valid.eq(1), wwd_data.eq(wbuf), wwd_strb.eq(wstrb)]
                    with m.If(wwd_ready):
                        m.d.sync += [wk.eq(0), wbuf.eq(0), wstrb.eq(0), started.eq(0)]
                        m.next = f"{name}_FILL"
                        with m.If(wi == count):
                            m.next = f"{name}_WAIT"
                with m.State(f"{name}_WAIT"):
                    m.d.sync += started.eq(1)
                    with m.If(started & ~ww_busy):
                        m.next = nxt

            def imp_item(i):
                m.d.comb += acc_r.addr.eq(i)
                return acc_r.data, 1

            def dead_item(i):
                m.d.comb += sp_r.addr.eq(i)
                return 0, sp_r.data[1]

            def himp_item(i):
                m.d.comb += [himp_r.addr.eq(i), hsum_r.addr.eq(i)]
                return Mux(hdead.bit_select(i[:MH.bit_length()], 1), himp_r.data, imp_add(himp_r.data, hsum_r.data)), 1

            row_writer("WB_IMP", st_base + sf["imp_off"], slots, 64, imp_item, "WB_DEAD_CMD")
            row_writer("WB_DEAD", st_base + sf["dead_off"], slots, 8, dead_item, "WB_HIMP_CMD")
            row_writer("WB_HIMP", st_base + sf["himp_off"], Hq, 64, himp_item, "WB_HDEAD")
            with m.State("WB_HDEAD"):
                m.next = "DONE"
                with m.If(self.position == 0):
                    m.next = "WB_HDEAD_CMD"
            row_writer("WB_HDEAD", st_base + sf["hdead_off"], Hq, 8, lambda i: (0, 1), "DONE")
        return m
