"""The app wing: an offline Clarifai app (inputs, annotations, embeddings) on disk, and its search."""
