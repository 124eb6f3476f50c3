"""The RTL simulation backend: the kernel's Verilog under Verilator or Icarus, driven over a Unix socket.

``device.RtlDevice`` (in the host's process) implements hw/device.py; it starts ``launch`` in a child
process, which builds the simulation (sim/toolchain.py) and runs ``server`` as the cocotb test inside the
simulator. The AXI memories behind the kernel's masters are the Verilog model sim/hdl/axi_mem_model.v
(with the simulation top of sim/simtop.py, the default) or the cocotbext-axi RAMs of ``axi_mem``."""
