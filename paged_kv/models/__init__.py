"""Reference model integration: a Llama-family decoder over the paged cache, a loader of
Hugging Face checkpoint directories, and a continuous-batching greedy generator.

Optional: loading needs ``pip install 'paged_kv[models]'`` (safetensors; tokenizers for
text prompts). Not imported by ``import paged_kv``.
"""
