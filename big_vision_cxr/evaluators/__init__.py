"""Evaluators of the five tasks and perplexity (registered in registry.EVALUATORS)."""
