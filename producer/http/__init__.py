"""The thin HTTP facade: OpenAI / infinity / TEI / Cohere-shaped routes that enqueue and wait."""
