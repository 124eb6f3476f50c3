"""TOPK execution unit of the kernel: SpAtten's cascade token / head selection after a run,
bit-exactly ``sim/emu.py: EmuDevice._topk`` (docs/numerics.md "SpAtten").

Word: d = the SpAtten descriptor (weights0, hw/memmap.SPT_FIELDS: a 64-byte header, then the layers'
token and head keep numerators, u32 Q0.16). Registers: position and n_tokens (last = position + T - 1).

  1. the header (64 bytes) and the 2 * layers keep numerators (into an on-chip table) through the
     byte unpacker of weight port 0, with emu's checks in emu's order;
  2. the candidates: the stored positions in [sink, last - recent] in position order. Linear cache:
     slots sink..min(slots - 1, last - recent). Ring (slots = S + W): the held window positions are
     max(S, last - W + 1)..last, so the candidates are one rotation of the window slots, i.e. at most
     two runs of consecutive slots (the first starts at S + (lo - S) mod W, one division);
  3. per layer, tokens then heads (the heads: one run, slots 0..H-1):
       IMP   the layer's importance of the candidates (u64, at most two bursts, one item per cycle)
             is added, saturating at 2**63 - 1 (hw/numerics.imp_add), to the on-chip running sum;
       from the start layer on:
       DEAD  the layer's flag bytes of the candidates: alive = flag 0 and not dropped on chip before;
       SEL   k = (keep_q * n) >> 16 (heads: at least 1); if more than k are alive, the alive running
             sums stream into hw/rtl/topk.TopK (ties -> lower candidate index = lower position); its
             kept indices come out ascending and are merged with a walk over the alive candidates:
             every alive one not kept gets its cumulative dropped bit;
       WRITE the flag bytes of the dropped candidates (cumulative: those dropped at this or an earlier
             layer) are written as 1 with byte strobes (the other bytes stay as they are), which is
             emu's "flag the dropped ones at this and every later layer"; skipped while none dropped.

Status codes (as sim/emu.py): n_tokens outside 1..max_prefill, a descriptor not 64-byte aligned, layers 0
or > max_layers, slots 0 or > max_context, heads 0 or > memmap.spatten_max_heads, start_layer >= layers,
a ring with window 0 or slots != sink + window, state offsets (state_off, layer_bytes, imp_off, dead_off,
himp_off, hdead_off) not multiples of 64 -> STATUS_SHAPE; wrong magic, a descriptor past the 4 GiB
offset space -> STATUS_ADDR_RANGE; the state past the 4 GiB offset space of weights0 -> STATUS_KV_REGION.

Cost: per layer about n (IMP) + n (DEAD) + 2n (feed + walk) + the quick-select's ~3n per round +
n (WRITE) cycles for n candidates, plus a memory latency per burst; the heads the same with H.
"""
from __future__ import annotations

from amaranth import Cat, Const, Module, Mux, Signal
from amaranth.lib import memory

from hw import memmap, regmap

from .attn_unit import Unpacker
from .sfu import Divider
from .topk import TopK
from .unit import Unit, _end64

IMP_MAX = (1 << 63) - 1


class TopkUnit(Unit):
    WRITES_WEIGHTS = True       # the pruned flags live in weights0
    WRITE_PORTS = (0,)          # ... and only there: the kernel multiplexes port 0's write data alone

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        d, = self.fields("d")
        W, Wb, lgWb = self.W, self.Wb, self.lgWb
        T = self.n_tokens
        NC = cfg.max_context
        MH = memmap.spatten_max_heads(cfg.max_hidden)
        NL = cfg.max_layers
        DEPTH = NC + MH                     # candidates (tokens) then heads at NC + h

        m.submodules.bu = bu = Unpacker(W, 8)       # descriptor / flag bytes
        m.submodules.bw = bw = Unpacker(W, 64)      # importance items
        m.submodules.div = div = Divider(34, 32)
        m.submodules.topk = tk = TopK(max(NC, MH), width=64)

        def mem(name, shape, depth):
            mm_ = memory.Memory(shape=shape, depth=depth, init=[])
            m.submodules[name] = mm_
            return mm_.write_port(), mm_.read_port(domain="comb")

        run_w, run_r = mem("run_mem", 64, DEPTH)     # running importance sums
        drp_w, drp_r = mem("drop_mem", 1, DEPTH)     # dropped at this or an earlier layer
        alv_w, alv_r = mem("alive_mem", 1, DEPTH)    # alive at the current layer
        kq_w, kq_r = mem("keep_mem", 32, 2 * NL)     # token keep numerators, then head keep numerators

        # ---- descriptor
        hdr = Signal(512)
        hf = {name: hdr[32 * i: 32 * i + 32] for i, name in enumerate(memmap.SPT_FIELDS)}
        L, S, Wn, slots, H, R = hf["layers"], hf["sink"], hf["window"], hf["slots"], hf["heads"], hf["recent"]
        ring = hf["ring"] != 0

        # ---- weight port 0: reads into the unpackers, writes of flag beats
        wd = self.w_data[0]
        m.d.comb += [bu.i.valid.eq(wd.valid), bu.i.payload.eq(wd.payload),
                     bw.i.valid.eq(wd.valid), bw.i.payload.eq(wd.payload), wd.ready.eq(bu.i.ready | bw.i.ready)]

        def w_read(addr, count, words=False):
            """Read *count* bytes at byte address *addr* of port 0 into the byte unpacker (or, with
            *words*, 64-bit items into the item unpacker: addr and count multiples of 8)."""
            lo = addr[:lgWb]
            m.d.comb += [self.w_cmd[0].valid.eq(1), self.w_cmd[0].payload.addr.eq(addr & ~(Wb - 1)),
                         self.w_cmd[0].payload.beats.eq((lo + count + Wb - 1) >> lgWb)]
            u = bw if words else bu
            m.d.comb += [u.skip.eq(lo >> 3 if words else lo), u.count.eq(count >> 3 if words else count),
                         u.start.eq(self.w_cmd[0].ready)]
            return self.w_cmd[0].ready

        # ---- candidates
        last = Signal(35)
        m.d.comb += last.eq(self.position + T - 1)
        lo_r = Signal(35)               # ring: oldest held window position
        m.d.comb += lo_r.eq(Mux(last + 1 > S + Wn, last + 1 - Wn, S))
        lo = Signal(35)
        m.d.comb += lo.eq(Mux(ring, lo_r, S))
        hi_lin = Signal(35)             # linear: the newest candidate slot + 1
        m.d.comb += hi_lin.eq(Mux(last + 1 - R < slots, last + 1 - R, slots))
        ncand = Signal(35)
        with m.If(ring):
            m.d.comb += ncand.eq(Mux(last + 1 > R + lo, last + 1 - R - lo, 0))
        with m.Else():
            m.d.comb += ncand.eq(Mux((last + 1 > R) & (hi_lin > S), hi_lin - S, 0))
        n_tok = Signal(range(NC + 1))
        s0 = Signal(32)                 # slot of the first candidate
        n1 = Signal(range(NC + 1))      # candidates in the first run of slots (from s0)

        # ---- per layer / kind
        li = Signal(range(NL + 1))
        kind = Signal()                 # 0 tokens, 1 heads
        base = Signal(range(DEPTH + 1))
        nk = Signal(range(max(NC, MH) + 1))     # candidates of this kind
        m.d.comb += [base.eq(Mux(kind, NC, 0)), nk.eq(Mux(kind, H, n_tok))]
        seg = Signal()                  # run of slots (0, 1)
        seg_slot = Signal(32)
        seg_n = Signal(range(NC + 1))
        seg_c0 = Signal(range(NC + 1))  # candidate index of the run's first slot
        with m.If(kind):
            m.d.comb += [seg_slot.eq(0), seg_n.eq(Mux(seg, 0, H)), seg_c0.eq(0)]
        with m.Else():
            m.d.comb += [seg_slot.eq(Mux(seg, S, s0)), seg_n.eq(Mux(seg, n_tok - n1, n1)), seg_c0.eq(Mux(seg, n1, 0))]
        lay = Signal(64)
        m.d.comb += lay.eq(self.weights[0] + hf["state_off"] + li * hf["layer_bytes"])
        imp_addr = Signal(64)
        dead_addr = Signal(64)
        m.d.comb += [imp_addr.eq(lay + Mux(kind, hf["himp_off"], hf["imp_off"]) + (seg_slot << 3)),
                     dead_addr.eq(lay + Mux(kind, hf["hdead_off"], hf["dead_off"]) + seg_slot)]
        c = Signal(range(DEPTH + 1))    # candidate index (within the kind)
        j = Signal(range(DEPTH + 1))    # alive index
        nalive = Signal(range(DEPTH + 1))
        ndrop = Signal(range(DEPTH + 1))        # dropped (cumulative) of this kind
        ndrop_h = Signal(range(MH + 1))
        ndrop_t = Signal(range(NC + 1))
        m.d.comb += ndrop.eq(Mux(kind, ndrop_h, ndrop_t))
        kq = Signal(32)
        m.d.comb += [kq_r.addr.eq(Mux(kind, L + li, li)), kq.eq(kq_r.data)]
        kraw = Signal(48)
        m.d.comb += kraw.eq((kq * nk) >> 16)
        kk = Signal(48)
        m.d.comb += kk.eq(Mux(kind & (kraw == 0), 1, kraw))

        idx = Signal(range(DEPTH + 1))
        m.d.comb += [run_r.addr.eq(idx), drp_r.addr.eq(idx), alv_r.addr.eq(idx),
                     run_w.addr.eq(idx), drp_w.addr.eq(idx), alv_w.addr.eq(idx)]
        m.d.comb += idx.eq(base + c)

        # ---- header / keep table bytes
        bcnt = Signal(16)
        acc = Signal(32)
        full = Signal(32)
        m.d.comb += full.eq(acc | (bu.o.payload << (bcnt[:2] << 3)))

        # ---- flag writes
        wbeat_strb = Signal(Wb)
        started = Signal()
        wlo = Signal(lgWb + 1)
        lane = Signal(lgWb)
        m.d.comb += lane.eq(wlo + (c - seg_c0))

        # ---- checks
        state_end = Signal(66)
        lb = hf["layer_bytes"]
        ends = [hf["imp_off"] + (slots << 3), hf["dead_off"] + slots, hf["himp_off"] + (H << 3), hf["hdead_off"] + H]
        mx = Signal(36)
        e01 = Mux(ends[0] > ends[1], ends[0], ends[1])
        e23 = Mux(ends[2] > ends[3], ends[2], ends[3])
        m.d.comb += mx.eq(Mux(e01 > e23, e01, e23))
        m.d.comb += state_end.eq(hf["state_off"] + (L - 1) * lb + mx)
        misaligned = Signal()
        m.d.comb += misaligned.eq((hf["state_off"] | lb | hf["imp_off"] | hf["dead_off"] | hf["himp_off"]
                                   | hf["hdead_off"])[:6] != 0)

        with self.fsm(m, "BEGIN"):
            with m.State("BEGIN"):
                with self.checks(m, ((T == 0) | (T > cfg.max_prefill), regmap.STATUS_SHAPE),
                                 (d[:6] != 0, regmap.STATUS_SHAPE), (_end64(d, 64), regmap.STATUS_ADDR_RANGE)):
                    m.d.sync += bcnt.eq(0)
                    m.next = "HDR_CMD"
            with m.State("HDR_CMD"):
                with m.If(w_read(self.weights[0] + d, Const(64, 32))):
                    m.next = "HDR_RX"
            with m.State("HDR_RX"):
                m.d.comb += bu.o.ready.eq(1)
                with m.If(bu.o.valid):
                    m.d.sync += [hdr.word_select(bcnt[:6], 8).eq(bu.o.payload), bcnt.eq(bcnt + 1)]
                with m.If(~bu.busy):
                    m.next = "CHECK"
            with m.State("CHECK"):
                bad_geometry = ((slots == 0) | (slots > NC) | (H == 0) | (hf["start_layer"] >= L) | (H > MH)
                                | (ring & ((Wn == 0) | (Cat(S, Const(0, 1)) + Wn != slots))) | misaligned)
                with self.checks(m, (hf["magic"] != memmap.MAGIC_SPT, regmap.STATUS_ADDR_RANGE),
                                 ((L == 0) | (L > NL), regmap.STATUS_SHAPE),
                                 (_end64(d, 64 + (L << 3)), regmap.STATUS_ADDR_RANGE),
                                 (bad_geometry, regmap.STATUS_SHAPE),
                                 (state_end > (1 << 32), regmap.STATUS_KV_REGION)):
                    m.d.sync += [n_tok.eq(ncand), bcnt.eq(0), acc.eq(0)]
                    with m.If(ring):
                        m.d.comb += [div.start.eq(1), div.num.eq(lo - S), div.den.eq(Wn)]
                        m.next = "RING"
                    with m.Else():
                        m.d.sync += [s0.eq(S), n1.eq(ncand)]
                        m.next = "KEEP_CMD"
            with m.State("RING"):
                with m.If(~div.busy):
                    m.d.sync += [s0.eq(S + div.rem),
                                 n1.eq(Mux(n_tok < Wn - div.rem, n_tok, Wn - div.rem))]
                    m.next = "KEEP_CMD"
            with m.State("KEEP_CMD"):
                with m.If(w_read(self.weights[0] + d + 64, L << 3)):
                    m.next = "KEEP_RX"
            with m.State("KEEP_RX"):
                m.d.comb += bu.o.ready.eq(1)
                with m.If(bu.o.valid):
                    m.d.sync += bcnt.eq(bcnt + 1)
                    with m.If(bcnt[:2] == 3):
                        m.d.comb += [kq_w.addr.eq(bcnt >> 2), kq_w.data.eq(full), kq_w.en.eq(1)]
                        m.d.sync += acc.eq(0)
                    with m.Else():
                        m.d.sync += acc.eq(full)
                with m.If(~bu.busy):
                    m.d.sync += [li.eq(0), kind.eq(0), seg.eq(0), c.eq(0), ndrop_t.eq(0), ndrop_h.eq(0)]
                    m.next = "IMP_CMD"

            # ---- importance: running sums
            with m.State("IMP_CMD"):
                with m.If(seg_n == 0):
                    with m.If(seg | kind):
                        m.next = "IMP_END"
                    with m.Else():
                        m.d.sync += seg.eq(1)
                with m.Else():
                    with m.If(w_read(imp_addr, seg_n << 3, words=True)):
                        m.next = "IMP_RX"
            with m.State("IMP_RX"):
                m.d.comb += bw.o.ready.eq(1)
                ssum = Signal(64)
                m.d.comb += ssum.eq(Mux(li == 0, 0, run_r.data) + bw.o.payload)
                with m.If(bw.o.valid):
                    m.d.comb += [run_w.data.eq(Mux(ssum[63], IMP_MAX, ssum)), run_w.en.eq(1),
                                 drp_w.data.eq(0), drp_w.en.eq(li == 0)]
                    m.d.sync += c.eq(c + 1)
                with m.If(~bw.busy):
                    with m.If(seg | kind):
                        m.next = "IMP_END"
                    with m.Else():
                        m.d.sync += seg.eq(1)
                        m.next = "IMP_CMD"
            with m.State("IMP_END"):
                m.d.sync += [seg.eq(0), c.eq(0), nalive.eq(0)]
                with m.If(li < hf["start_layer"]):
                    m.next = "NEXT"
                with m.Else():
                    m.next = "DEAD_CMD"

            # ---- flags: alive candidates
            with m.State("DEAD_CMD"):
                with m.If(seg_n == 0):
                    with m.If(seg | kind):
                        m.next = "SEL"
                    with m.Else():
                        m.d.sync += seg.eq(1)
                with m.Else():
                    with m.If(w_read(dead_addr, seg_n)):
                        m.next = "DEAD_RX"
            with m.State("DEAD_RX"):
                m.d.comb += bu.o.ready.eq(1)
                alive = Signal()
                m.d.comb += alive.eq((bu.o.payload == 0) & ~drp_r.data)
                with m.If(bu.o.valid):
                    m.d.comb += [alv_w.data.eq(alive), alv_w.en.eq(1)]
                    m.d.sync += [c.eq(c + 1), nalive.eq(nalive + alive)]
                with m.If(~bu.busy):
                    with m.If(seg | kind):
                        m.next = "SEL"
                    with m.Else():
                        m.d.sync += seg.eq(1)
                        m.next = "DEAD_CMD"

            # ---- selection
            with m.State("SEL"):
                m.d.sync += [c.eq(0), j.eq(0), seg.eq(0)]
                with m.If(nalive > kk):
                    m.d.comb += [tk.start.eq(1), tk.n.eq(nalive), tk.k.eq(kk)]
                    m.next = "FEED"
                with m.Else():
                    m.next = "WR_CHK"
            with m.State("FEED"):
                with m.If(c == nk):
                    m.d.sync += c.eq(0)
                    m.next = "WALK"
                with m.Elif(alv_r.data):
                    m.d.comb += [tk.i.valid.eq(1), tk.i.payload.eq(run_r.data)]
                    with m.If(tk.i.ready):
                        m.d.sync += c.eq(c + 1)
                with m.Else():
                    m.d.sync += c.eq(c + 1)
            with m.State("WALK"):
                # kept alive indices come out ascending: merge them with the alive candidates
                with m.If(c == nk):
                    m.d.sync += c.eq(0)
                    m.next = "WR_CHK"
                with m.Elif(~alv_r.data):
                    m.d.sync += c.eq(c + 1)
                with m.Elif(tk.o.valid & (tk.o.payload == j)):
                    m.d.comb += tk.o.ready.eq(1)
                    m.d.sync += [c.eq(c + 1), j.eq(j + 1)]
                with m.Elif(tk.o.valid | ~tk.busy):
                    m.d.comb += [drp_w.data.eq(1), drp_w.en.eq(1)]
                    m.d.sync += [c.eq(c + 1), j.eq(j + 1)]
                    with m.If(kind):
                        m.d.sync += ndrop_h.eq(ndrop_h + 1)
                    with m.Else():
                        m.d.sync += ndrop_t.eq(ndrop_t + 1)

            # ---- flag writes: 1 for every dropped candidate of this kind, byte strobes
            with m.State("WR_CHK"):
                m.d.sync += [c.eq(0), seg.eq(0)]
                with m.If(ndrop == 0):
                    m.next = "NEXT"
                with m.Else():
                    m.next = "WR_CMD"
            with m.State("WR_CMD"):
                with m.If(seg_n == 0):
                    with m.If(seg | kind):
                        m.next = "WR_SYNC"
                    with m.Else():
                        m.d.sync += seg.eq(1)
                with m.Else():
                    nb = (dead_addr[:lgWb] + seg_n + Wb - 1) >> lgWb
                    m.d.comb += [self.ww_cmd[0].valid.eq(1), self.ww_cmd[0].payload.addr.eq(dead_addr & ~(Wb - 1)),
                                 self.ww_cmd[0].payload.beats.eq(nb)]
                    with m.If(self.ww_cmd[0].ready):
                        m.d.sync += [wlo.eq(dead_addr[:lgWb]), wbeat_strb.eq(0)]
                        m.next = "WR_DATA"
            with m.State("WR_DATA"):
                # one candidate per cycle; a beat goes out at its last lane or the run's last candidate
                strb = Signal(Wb)
                m.d.comb += strb.eq(wbeat_strb | (drp_r.data << lane))
                last_c = (c + 1 == seg_c0 + seg_n)
                emit = (lane == Wb - 1) | last_c
                m.d.comb += [self.ww_data[0].payload.data.eq(Const(1, 8).replicate(Wb)),
                             self.ww_data[0].payload.strb.eq(strb), self.ww_data[0].valid.eq(emit)]
                with m.If(~emit):
                    m.d.sync += [wbeat_strb.eq(strb), c.eq(c + 1)]
                with m.Elif(self.ww_data[0].ready):
                    m.d.sync += [wbeat_strb.eq(0), c.eq(c + 1)]
                    with m.If(last_c):
                        with m.If(seg | kind):
                            m.next = "WR_SYNC"
                        with m.Else():
                            m.d.sync += seg.eq(1)
                            m.next = "WR_CMD"
            with m.State("WR_SYNC"):
                m.d.sync += started.eq(1)
                with m.If(started & ~self.ww_busy[0]):
                    m.d.sync += started.eq(0)
                    m.next = "NEXT"

            with m.State("NEXT"):
                m.d.sync += [c.eq(0), seg.eq(0)]
                with m.If(~kind):
                    m.d.sync += kind.eq(1)
                    m.next = "IMP_CMD"
                with m.Elif(li + 1 < L):
                    m.d.sync += [kind.eq(0), li.eq(li + 1)]
                    m.next = "IMP_CMD"
                with m.Else():
                    m.next = "DONE"
        return m
