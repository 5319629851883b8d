"""Ray batch jobs: prepare data, train, sweep, evaluate, and the end-to-end demo."""
