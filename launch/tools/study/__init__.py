"""Does reweighting help on your data? Arms over paired seeds, with confidence intervals.

Every arm (a set of config changes) is trained once per seed with `train.seed` = that seed,
so for one seed all arms start from the same initial weights and see the same data order:
the arm-minus-baseline differences are paired and their spread over seeds says how much of
a gain is noise. Runs go one after another (or one Slurm array task each), each as

    python -m launch.torchrun --standalone --nproc-per-node N -m launch.pretrain --config C \\
        --run-dir OUT/<arm>/seed<k> --set ... train.seed=<k>

and a finished run is reused, an unfinished one resumed (the trainer resumes from the run
directory's newest checkpoint), so an interrupted study goes on by running the same command.
The summary (OUT/summary.json, .md, .png) is computed from the runs' own config.yaml and
metrics.jsonl and the train blend file only.

    arms      the arm syntax             plan      runs, their checks, finished or not
    runner    training them here         slurm     or as a Slurm array
    summary   the statistics             markdown  and plot: the summary's tables and figure
    cli       `python -m launch.tools.study`
"""
