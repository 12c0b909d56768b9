"""Quantized weight formats: fp8.py (E4M3 with 128x128 block scales), with their references."""
