"""Graph passes: each takes a GraphModule and returns a result (detect, roll, rewrite)."""
