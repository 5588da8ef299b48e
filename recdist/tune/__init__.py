"""`recdist tune`: Ray Tune searches over a stage's settings, every trial a `recdist train` run (search.py)."""
