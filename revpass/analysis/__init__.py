"""Measuring a graph: what each node keeps for backward, its backward workspace, annotations."""
