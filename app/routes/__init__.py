"""One router per resource: generate, perplexity, models, health."""
