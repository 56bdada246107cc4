"""The vLLM backend: the KV connector that pushes captured samples from inside vLLM, its sender
thread, the request parameters, the producer-side backend and ``launch-vllm``."""
