"""`python -m featurewatch.platform.cli`, as the tests and scripts run it."""

from featurewatch.platform.cli import main

main()
