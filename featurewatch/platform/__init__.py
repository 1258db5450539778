"""What runs the services, by job: jobs/ (gather, SAE training and refresh, fine-tunes),
control/ (policies, the controller and its actor, actions), apps/ (the demos, `up`) and
cli/ (the `featurewatch` command). Each imports only the rooms below it.
"""
