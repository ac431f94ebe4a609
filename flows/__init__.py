"""Prefect flows: thin orchestration over the stylepipe library."""
