"""Learning from live traffic, the serving side: the vLLM server's draft is swapped in place for
better ones (``swap``, loaded into the engine as a worker extension) through its loopback address
(``engine``), which also reads vLLM's speculative-decoding counters."""
