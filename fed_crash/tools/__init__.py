"""The tools users run: the ``fed-crash`` command, ``flwr run`` from Python, experiments."""
