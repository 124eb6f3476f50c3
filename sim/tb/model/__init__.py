"""Kernel-level model tests: the same programs and buffers on the functional model
(sim/emu.EmuDevice) and on the RTL kernel under Verilator (sim/rtlsim/device.RtlDevice), compared
byte for byte. See harness.py."""
