"""What a user runs: the default demo, the realign demo and `featurewatch up`.

May import: platform/control, platform/jobs and everything below them.
"""
