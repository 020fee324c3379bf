"""The decoder (:mod:`ptp.decode.decoder`: the decoding loop) and what it runs on: the Draft
contract drafters fill (``draft``), the KV cache, attention and linear layers through ``ptp_ext``,
prompts in, and the uniform stream. Never imports ``ptp.drafters`` or ``ptp.train``.
"""
