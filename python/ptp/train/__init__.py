"""Training of the PTP drafter (and, reused, the masked-input drafter): data, packing, loops, checkpoints."""
