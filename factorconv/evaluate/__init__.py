"""Perplexity, KV-cache accounting (analytic and measured from a real cache) and side-by-side reports."""
