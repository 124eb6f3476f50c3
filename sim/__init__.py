"""Simulation of accllm: cocotb testbenches (Verilator, Icarus), the bit-exact functional model
and the cycle model of the accelerator."""
