"""Runnable examples: ``moe_layer`` (a fault-tolerant MoE layer on Mooncake EP with EPLB) and
``moe_demo`` (``python -m mooncake.ep.examples.moe_demo``: ranks die and come back, the output
stays unchanged)."""
