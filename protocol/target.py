"""The target a producer captures and a trainer expects: the one description both sides share.

- Layer ids follow vLLM's ``extract_hidden_states``: id ``k`` is the residual stream entering
  decoder layer ``k`` (id 0 = the embeddings), id ``N`` is the last decoder layer's output before
  the final norm. The default capture ``[2, N//2, N-3, N]`` is three auxiliary layers plus the
  last; checkpoints record only the auxiliary ids.
- ``sample_nbytes`` is what one captured sample weighs in a trainer's buffer: producers and
  trainers size credit and reports with the same rule.
"""

from __future__ import annotations

import torch


def sample_nbytes(num_tokens: int, num_layers: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes one sample occupies in the buffer: hidden states + int64 token ids + uint8 loss mask."""
    return num_tokens * (num_layers * hidden_size * dtype.itemsize + 8 + 1)
