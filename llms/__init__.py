"""Model backends: chat/completion clients, embeddings, log-probabilities, the request cache."""
