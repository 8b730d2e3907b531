"""Attention maps that explain an answer: where the answer's tokens looked in the prompt (`anneal explain`)."""
