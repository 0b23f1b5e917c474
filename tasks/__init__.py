"""Evaluation tasks: perplexity and few-shot in-context classification. No Luigi in here."""
