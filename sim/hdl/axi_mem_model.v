// AXI4 slave memory for the `rtl` runtime backend (simulation only, not synthesisable).
//
// One HBM pseudo-channel as the host runtime sees it: a flat memory of 2**ADDR_BITS bytes (addresses
// are taken modulo that size), INCR bursts of full-width beats. Reads: every AR is accepted at once
// (up to 64 queued); its first beat is released LATENCY cycles after the address handshake and the
// beats of queued bursts follow back to back (a pipelined channel). Writes: AW queued (16), W beats
// with byte strobes, one B per burst. The host reaches the contents through cocotb handles on `mem`
// (host/backends/rtl_server.py). Written in plain Verilog so the simulator runs it at full speed;
// the cocotb benches (sim/tb) keep the cocotbext-axi models with random back-pressure.
`timescale 1ns/1ps
module axi_mem_model #(
    parameter DATA_W = 256,
    parameter ADDR_BITS = 28,
    parameter LATENCY = 100,
    parameter FILE = "mem.hex"
) (
    input  wire                 clk,
    input  wire                 rst_n,
    // backdoor for the host: $readmemh / $writememh of FILE over beats [bd_lo, bd_hi]
    input  wire                 bd_load,
    input  wire                 bd_dump,
    input  wire [31:0]          bd_lo,
    input  wire [31:0]          bd_hi,
    input  wire [0:0]           awid,
    input  wire [63:0]          awaddr,
    input  wire [7:0]           awlen,
    input  wire [2:0]           awsize,
    input  wire [1:0]           awburst,
    input  wire                 awvalid,
    output wire                 awready,
    input  wire [DATA_W-1:0]    wdata,
    input  wire [DATA_W/8-1:0]  wstrb,
    input  wire                 wlast,
    input  wire                 wvalid,
    output wire                 wready,
    output reg  [0:0]           bid,
    output wire [1:0]           bresp,
    output wire                 bvalid,
    input  wire                 bready,
    input  wire [0:0]           arid,
    input  wire [63:0]          araddr,
    input  wire [7:0]           arlen,
    input  wire [2:0]           arsize,
    input  wire [1:0]           arburst,
    input  wire                 arvalid,
    output wire                 arready,
    output reg  [0:0]           rid,
    output reg  [DATA_W-1:0]    rdata,
    output wire [1:0]           rresp,
    output reg                  rlast,
    output reg                  rvalid,
    input  wire                 rready
);
    localparam LG_B = $clog2(DATA_W / 8);
    localparam DEPTH = 1 << (ADDR_BITS - LG_B);
    reg [DATA_W-1:0] mem [0:DEPTH-1];

    always @(posedge clk) begin
        if (bd_load) $readmemh(FILE, mem, bd_lo, bd_hi);
        if (bd_dump) $writememh(FILE, mem, bd_lo, bd_hi);
    end

    reg [63:0] cycle;
    always @(posedge clk) cycle <= cycle + 64'd1;

    // ---- reads
    reg [ADDR_BITS-LG_B-1:0] ar_q_addr [0:63];
    reg [7:0]  ar_q_len  [0:63];
    reg [0:0]  ar_q_id   [0:63];
    reg [63:0] ar_q_due  [0:63];
    reg [6:0]  ar_wp, ar_rp;
    wire [6:0] ar_count = ar_wp - ar_rp;
    assign arready = rst_n && (ar_count < 7'd64);
    reg        r_busy;
    reg [ADDR_BITS-LG_B-1:0] r_addr;
    reg [7:0]  r_left;
    assign rresp = 2'b00;
    wire r_take = !rvalid || rready;
    always @(posedge clk) begin
        if (!rst_n) begin
            ar_wp <= 0; ar_rp <= 0; r_busy <= 0; rvalid <= 0; rlast <= 0; rid <= 0; r_left <= 0;
        end else begin
            if (arvalid && arready) begin
                ar_q_addr[ar_wp[5:0]] <= araddr[ADDR_BITS-1:LG_B];
                ar_q_len[ar_wp[5:0]] <= arlen;
                ar_q_id[ar_wp[5:0]] <= arid;
                ar_q_due[ar_wp[5:0]] <= cycle + LATENCY;
                ar_wp <= ar_wp + 7'd1;
            end
            if (r_take) begin
                if (r_busy) begin
                    rdata <= mem[r_addr];
                    rvalid <= 1'b1;
                    rlast <= (r_left == 8'd0);
                    r_addr <= r_addr + 1'b1;
                    r_left <= r_left - 8'd1;
                    if (r_left == 8'd0) r_busy <= 1'b0;
                end else if ((ar_count != 0) && (ar_q_due[ar_rp[5:0]] <= cycle)) begin
                    rdata <= mem[ar_q_addr[ar_rp[5:0]]];
                    rid <= ar_q_id[ar_rp[5:0]];
                    rvalid <= 1'b1;
                    rlast <= (ar_q_len[ar_rp[5:0]] == 8'd0);
                    r_addr <= ar_q_addr[ar_rp[5:0]] + 1'b1;
                    r_left <= ar_q_len[ar_rp[5:0]] - 8'd1;
                    r_busy <= (ar_q_len[ar_rp[5:0]] != 8'd0);
                    ar_rp <= ar_rp + 7'd1;
                end else begin
                    rvalid <= 1'b0;
                end
            end
        end
    end

    // ---- writes
    reg [ADDR_BITS-LG_B-1:0] aw_q_addr [0:15];
    reg [0:0]  aw_q_id   [0:15];
    reg [4:0]  aw_wp, aw_rp;
    wire [4:0] aw_count = aw_wp - aw_rp;
    assign awready = rst_n && (aw_count < 5'd16);
    reg [ADDR_BITS-LG_B-1:0] w_addr;
    reg        w_active;
    assign wready = rst_n && (w_active || aw_count != 0);
    reg [0:0]  b_q_id [0:15];
    reg [4:0]  b_wp, b_rp;
    assign bvalid = rst_n && (b_wp != b_rp);
    assign bresp = 2'b00;
    always @(*) bid = b_q_id[b_rp[3:0]];
    integer i;
    always @(posedge clk) begin
        if (!rst_n) begin
            aw_wp <= 0; aw_rp <= 0; w_active <= 0; b_wp <= 0; b_rp <= 0;
        end else begin
            if (awvalid && awready) begin
                aw_q_addr[aw_wp[3:0]] <= awaddr[ADDR_BITS-1:LG_B];
                aw_q_id[aw_wp[3:0]] <= awid;
                aw_wp <= aw_wp + 5'd1;
            end
            if (wvalid && wready) begin
                for (i = 0; i < DATA_W / 8; i = i + 1)
                    if (wstrb[i])
                        mem[w_active ? w_addr : aw_q_addr[aw_rp[3:0]]][i*8 +: 8] <= wdata[i*8 +: 8];
                if (wlast) begin
                    w_active <= 1'b0;
                    b_q_id[b_wp[3:0]] <= w_active ? aw_q_id[aw_rp[3:0]] : aw_q_id[aw_rp[3:0]];
                    b_wp <= b_wp + 5'd1;
                    aw_rp <= aw_rp + 5'd1;
                end else begin
                    w_active <= 1'b1;
                    w_addr <= (w_active ? w_addr : aw_q_addr[aw_rp[3:0]]) + 1'b1;
                end
            end
            if (bvalid && bready) b_rp <= b_rp + 5'd1;
        end
    end
endmodule
