"""SIGKILL ``python -m vlora_jax.main`` mid-save, rerun
the same command, and get exactly the uninterrupted run's result (experiments/kill_trials.py).

Bitwise on one CPU device: the same compiled step applied to the same restored bits, with the
data position and the RNG in the checkpoint. More trials, also at random moments and on 8
devices: ``python experiments/kill_trials.py --trials 12`` (results/kill_trials.json).
"""


import pytest

from experiments import kill_trials


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(tmp_path):
  lines = []
  # One trial keeps CI short: a kill mid-save, compared bitwise. experiments/kill_trials.py runs
  # the rest (start-up and repeated kills, 8 devices -> 1) and test_checkpoint.py restores
  # across device counts.
  results = kill_trials.run_trials(tmp_path, ["save"], seed=1, kills=1, log=lines.append)
  report = "\n".join(lines)
  assert all(r["passed"] for r in results), report
  killed = [e for r in results for e in r["kills"] if e["killed"]]
  assert len(killed) >= 1, report  # at most one launch may finish before its kill
  save = results[0]["kills"][0]
  assert not save["killed"] or save["mid_save"], report  # the save trial did kill mid-save
  assert all("resumed" in (r["final_origin"] or "") for r in results
             if any(n.isdigit() for n in r["kills"][-1].get("on_disk", []))), report
