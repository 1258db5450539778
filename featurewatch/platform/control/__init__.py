"""The control loop: trigger policies (policies.py), the controller that evaluates them
(controller.py) and its Ray actor (actor.py), and the actions it runs (actions.py).

The controller's actor lives here rather than in actors/: it runs the control loop,
which calls jobs and actors, so it sits above them.

May import: platform/jobs, actors/, analysis/, capture/, sae/, proto/, storage/, config,
errors.
"""
