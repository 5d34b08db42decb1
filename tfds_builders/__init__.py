"""TFDS dataset builders (cxr_tb)."""
