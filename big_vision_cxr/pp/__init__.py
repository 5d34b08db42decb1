"""Preprocessing ops (registered in registry.PP_OPS) and the pp-string builder."""
