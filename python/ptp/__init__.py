"""ptp: exact speculative decoding (PTP, masked-input MTP, MTP heads, prompt lookup) over HF models."""
__version__ = "0.1.0"
