"""Layer "parallel": how ranks meet, below everything that builds a model.

``distributed`` (process groups under torchrun or one process, the collective timeout, rank 0),
``compat`` (the only CPU/gloo-specific code, each shim naming the megatron-core call site it
covers), ``collectives`` (collective counting and the link simulator), ``clock`` (the host clock
read after the device finished). Imports only ``errors`` and ``files`` of the package.
"""
