"""What producers and trainer ranks share, and the only package both import: the wire (messages,
codec, sockets with CURVE), the target description and layer-id rule, the prepared dataset and
hidden-state file formats, and the conventions every process keeps (logging, stop signals, malloc
tuning, the ``draftstream`` dispatcher).

Import the submodules (``protocol.codec``, ``protocol.messages``, ...) directly: this package
re-exports nothing, so the ``draftstream`` dispatcher and the ``run`` launcher start without
importing torch.
"""
