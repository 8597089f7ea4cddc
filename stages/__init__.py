"""Thin DVC entry points: parse params, call the diet library, write one artifact."""
