"""Learning from live traffic, the serving side (``draftstream serve``).

::

    clients -> front (front door: proxy, token tap) -> vLLM on loopback, serving the draft
                 |                                         ^ swap (worker extension, in place)
                 v                                         |
               traffic (controls, bounded queue)         engine (HTTP client: swap, counters)
                 |                                         ^
                 v                                         |
               serve: rows -> traffic-NNNNN.jsonl,       serve: draft watcher, guarded by
                      held-out slice                            acceptance on the held-out slice

How served traffic is captured, and why this way. A row for the draft is the served prompt
followed by the tokens the target generated: those are the sequences the draft must predict. Three
ways to get their hidden states were weighed:

- *In-engine tap* (a vLLM plugin copying the aux hidden states Eagle-3 speculation already
  computes): no extra compute, but those states exist only at the positions the target verified,
  interleaved with rejected draft positions and spread over many engine steps; the copy would sit
  in the serving hot path; and it patches vLLM model-runner internals that change every release.
- *Shadow engine* beside the server (``extract_hidden_states`` replaying each finished request):
  exact, but it spends one prefill per captured request on the serving hardware.
- *Token tap at the front door* (chosen): the front door asks vLLM for the token ids of each answer
  (``return_token_ids``) and writes rows of ids only; hidden states are computed where training
  runs, by draftstream's own producers (Hugging Face, or vLLM ``extract_hidden_states`` with our
  connector), from the same target and the same tokens. Causal attention makes that prefill give
  the hidden states serving computed (vLLM's and the Hugging Face captures agree to 1e-6, see
  ``tests/vllm/engine/test_capture.py``). Serving pays only for reading the answer as it passes
  (``draftstream bench serve-cost`` measures it against plain vLLM); the prefill is paid at the
  trainer's pace, on its hardware, and when training falls behind, rows are shed from a bounded
  queue, never by making a request wait. Rows are a few KB, so they are kept on disk: every one is
  accounted for, and a training that restarts loses none.

Swapping drafts: vLLM 0.32's weight-update endpoints move weights with CUDA-only engines, and its
``reload_weights`` reloads the target; ``swap`` loads a speculators checkpoint into the serving
draft with vLLM's own in-place layerwise reload, between two engine steps (see its docstring).
"""
