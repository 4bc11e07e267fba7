"""The fault soak (``scripts/soak``): a worker under random faults, with every message accounted
for. See :mod:`soak.run`."""
