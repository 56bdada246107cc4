"""The wire between producers and trainer ranks: messages, codec, sockets, credit, and the
hidden-state file format. The only package that both ``producer`` and ``trainer`` import.

Import the submodules (``protocol.codec``, ``protocol.messages``, ...) directly: this package
re-exports nothing, so the ``draftstream`` dispatcher and the ``run`` launcher start without
importing torch.
"""
