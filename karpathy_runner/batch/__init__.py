"""Work on many runs: sweeps of a grid (sweep.py), adaptive searches through Optuna with
successive halving (search.py; its space.py and study.py), their points as Slurm or submitit
jobs (launch.py, jobs.py), and reading many runs at once: select, sort, compare, group
(query.py)."""
