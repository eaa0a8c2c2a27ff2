"""Models: built-in models fetched from PyPI, local directories and hub ids, loaded for a task."""
