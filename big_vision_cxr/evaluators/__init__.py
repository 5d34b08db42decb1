"""Evaluators of the five tasks and perplexity (registered in registry.EVALUATORS).

Also their shared COCO code (coco.py), the factory of config.evals
(common.from_config), trivial baselines (baselines.py), the results table with
patient-bootstrap intervals (table.py), its pictures (plots.py) and the command
line on prediction files (__main__.py: python -m big_vision_cxr.evaluators).
Scoring a checkpoint on any dataset: python -m big_vision_cxr.evaluate.
"""
