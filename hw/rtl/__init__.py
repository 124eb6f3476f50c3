"""The accelerator's RTL in Amaranth 0.5 (issue 6: kernel shell, DMA, instruction fetch/decode,
matrix engine; issue 7 plugs further execution units into the same dispatch).

Modules:
  axi      AXI4 / AXI4-Lite signatures, the s_axi_control slave (ap_ctrl_hs + arguments of
           hw/regmap.py), the read DMA (bursts in flight to hide HBM latency) and the write DMA.
  kernel   the Vitis RTL-kernel top (`accllm_kernel`): ports named as Vitis infers them.
"""
