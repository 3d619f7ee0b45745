"""The experiment harness: the EDropout paper's experiments, built on the library (``edropout``), which
does not need it. As torchvision's references/classification, it is one way to use the library, kept
apart from it:

    config.py    TrainConfig (each field with its command-line help), its checks, derived values
    rundir.py    run directories: atomic files, safe checkpoints, metrics, config.json, RNG states
    data.py      the data sets (torchvision readers; Debian's Fashion-MNIST; scikit-learn's digits)
    kinds.py     the kinds of run (original, edropout, random, the baselines), each described once
    build.py     a run's pieces from its config: data, network + controller, optimiser, batches
    loop.py      the training loop of one run, top to bottom
    runs.py      a run as a plan of sibling runs (Original, the run, baselines), several seeds, resume
    report.py    the test-set report: the rows, BatchNorm re-estimation, mean ± std over seeds
    plots.py     plots.png from metrics.jsonl, compare.png from a report
    export.py    slim.pt / slim.ts of a finished run
    cli.py       the ``edropout`` command (``python -m edropout``)

    from edropout.experiments import TrainConfig, train
    run_dir = train(TrainConfig(dataset="digits", epochs=15))   # then report.md, plots.png in run_dir
    edropout.experiments.report.report(run_dir)                 # the report again (eval)
    edropout.experiments.export.export(run_dir)                 # slim.pt, slim.ts
"""

from .config import RunError, TrainConfig
from .runs import resume, train, train_runs

__all__ = ["TrainConfig", "RunError", "train", "train_runs", "resume"]
