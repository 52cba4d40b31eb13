"""The experiment store: every file a search, a retrain and the analysis read and write.

`layout` names each file and folder of an experiment; `atomic` is the one way they
are written (aside, fsync, rename); `experiments` reads an experiment back;
`storage` (a folder or a URI), `lease` (one driver per experiment),
`trial_records` (each trial's own record), `cost` (the ledger), `integrity`
(damaged files refused in one line) and `stage1_cache` (stage 1 shared by trials).
"""
