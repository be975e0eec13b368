"""Stage 2 of METHOD.md: samples to vectors.

Owns: the encoders (text, image) and the fusion of their vectors (``encoders``), the speech
encoder (``audio``: resemblyzer's GE2E or a Hugging Face audio model), the video encoder
(``video``: sampled frames through the image encoder, averaged), and the
embedding stage that runs them in Ray Data actors over shards of the pool, resumable
(``stage``). The stage has one entry point, ``stage.embed_pool`` (the pool in, the stage's
directory written, its manifest returned), and ``stage.load_stage`` to read the vectors back.
A text model that is a sentence-transformers model (``modules.json``) embeds through
``SentenceTransformer`` with its own pooling, prompts and maximum length; any other through a
bare ``AutoModel`` pooled with ``embed.pooling``; ``encoders.text_encoding`` decides which, once,
from the model's files (the pipeline's pre-flight calls it too).
Imports ``io``, ``runtime``, ``config`` and ``errors``.
"""
