"""localtag: offline image tagging with CLIP zero-shot inference, in Clarifai's JSON."""

__version__ = "0.1.0"
