"""Inference: the scoring plan (plan.py, no Ray), the scoring core (scoring.py), writing scored tables (scored.py),
Ray Data passes (ray_data.py, the only Ray code here), the session feature step, ranking, analyst outputs."""
