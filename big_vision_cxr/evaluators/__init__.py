"""Evaluators of the five tasks and perplexity (registered in registry.EVALUATORS).

Also their shared COCO code (coco.py), the factory of config.evals
(common.from_config), trivial baselines (baselines.py) and the command line
(__main__.py: python -m big_vision_cxr.evaluators).
"""
