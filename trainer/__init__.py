"""The AND trainer: data, models, memory bank, loss, the round loop, evaluation, checkpoints.

One file per concern:
    config.py        TrainConfig (the one configuration), file loading, validation, defaults
    data.py          datasets returning (image, label, index); in-memory or streamed
    augment.py       the paper's augmentation as batched, seeded tensor ops (any device)
    sharding.py      per-rank epoch shards and batches (pure functions)
    seeding.py       seeds derived from (seed, purpose, round, epoch[, rank]); determinism
    models.py        smallcnn / resnet18 / resnet50 / alexnet + 128-d L2-normalised head
    memory.py        the memory bank: init and the EMA update (Eq 8), outside autograd
    loss.py          the AND / instance losses as pure functions (Eq 2, 3, 7)
    schedule.py      SGD and the per-round lr schedule (pure functions)
    knn.py           weighted kNN evaluation, chunked; eval-mode embedding
    linear_probe.py  linear classifier on frozen features
    checkpoint.py    world-size-independent checkpoints
    loop.py          the round loop (train), read top to bottom
    report.py        round table, summary.json, plots
    speed.py         training-step throughput (`trainer speed`)
    cli.py           the `trainer` command
    world.py, distributed.py   the process group (World) and the W-rank launcher
"""
