"""A run's files on disk: what training leaves in a workdir, and what reads and writes it after.

  checkpoint_format.py  the checkpoint format: step directories, which steps are finished, the JSON
                        meta, the arrays and their fingerprints (training writes it, all else reads)
  trained.py            a trained run read back: `vlora_jax.load(workdir)` -> model, params, config
  outputs.py            the files the commands write (exports, eval.json, reports): atomic, never
                        inside a run's checkpoints, never over a file the command did not write

Training itself, which writes a run, is `vlora_jax.train`.
"""
