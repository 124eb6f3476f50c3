"""The accelerator's RTL in Amaranth 0.5: the kernel shell, DMAs, instruction fetch/decode and the matrix
engine (kernel.py), with the execution units plugged into the same dispatch (unit.py, units.py, attn_unit.py, topk_unit.py).

Modules:
  axi      AXI4 / AXI4-Lite signatures, the s_axi_control slave (ap_ctrl_hs + arguments of
           hw/regmap.py), the read DMA (bursts in flight to hide HBM latency) and the write DMA.
  kernel   the Vitis RTL-kernel top (`accllm_kernel`): ports named as Vitis infers them (tops.vitis_ports).
  unit     what every execution unit shares: its signature and the start / status / done handshake (Unit).
"""
