"""ASHA benchmark: the same grid searched twice through Tessera's sweep pieces (``tune_space``, the ASHA
scheduler of a sweep file): once with every trial at full budget (FIFO), once with ASHA. Prints each run's
best validation accuracy and total training epochs, and the two ratios the issue sets (ASHA within 1 % of the
full grid's best metric, with at most 40 % of its epochs).

The task is small and synthetic so the sweep runs in minutes on two cores: a two-layer MLP on a
scikit-learn classification problem, trained full-batch; the grid is learning rate x hidden width x weight
decay (the shape of paper 000's optimiser search). Each epoch is one report to the scheduler.

Usage: ``python benchmarks/asha.py [--epochs 27] [--concurrency 2]``.
"""

from __future__ import annotations

import argparse
import time


def make_data(seed: int = 0):
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    x, y = make_classification(
        n_samples=3000, n_features=40, n_informative=12, n_redundant=8, n_classes=3, class_sep=0.8,
        flip_y=0.02, random_state=seed,
    )  # fmt: skip
    return train_test_split(x.astype("float32"), y, test_size=0.3, random_state=seed)


def trainable(config, data, epochs: int):
    import torch
    from ray import tune

    torch.manual_seed(0)
    torch.set_num_threads(1)
    xtr, xva, ytr, yva = (torch.as_tensor(a) for a in data)
    width = int(config["width"])
    model = torch.nn.Sequential(torch.nn.Linear(40, width), torch.nn.ReLU(), torch.nn.Linear(width, 3))
    opt = torch.optim.SGD(model.parameters(), lr=config["lr"], momentum=0.9, weight_decay=config["weight_decay"])
    for _ in range(epochs):
        for _ in range(20):  # 20 full-batch steps per epoch
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xtr), ytr).backward()
            opt.step()
        with torch.no_grad():
            acc = (model(xva).argmax(1) == yva).float().mean().item()
        tune.report({"val_accuracy": acc})


def run(scheduler_name: str, epochs: int, concurrency: int, data) -> tuple[float, int, float]:
    """(best final val accuracy, total epochs trained, seconds) for one search over the grid."""
    from functools import partial

    from ray import tune

    from tune.config import SweepConfig
    from tune.sweep import grid_points, make_scheduler, make_searcher

    sweep = SweepConfig(
        name="bench",
        recipe="demo_tiles",
        space={
            "lr": {"grid": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3]},
            "width": {"grid": [8, 64]},
            "weight_decay": {"grid": [0.0, 0.01]},
        },
        search={"algorithm": "grid", "num_samples": 1},
        scheduler={"name": scheduler_name, "grace_period": 1, "reduction_factor": 3},
    )
    fn = tune.with_resources(partial(trainable, data=data, epochs=epochs), {"CPU": 1})
    # as `tessera tune` runs a grid: its points in a seeded random order, through the variant generator
    points = grid_points(sweep.space, sweep.search.seed)
    t0 = time.perf_counter()
    grid = tune.Tuner(
        fn,
        param_space={k: tune.choice(p.grid) for k, p in sweep.space.items()},
        tune_config=tune.TuneConfig(
            metric="val_accuracy",
            mode="max",
            num_samples=len(points),
            scheduler=make_scheduler(sweep, epochs),
            search_alg=make_searcher(sweep, "val_accuracy", "max", concurrency, points),
        ),
        run_config=tune.RunConfig(name=f"bench-{scheduler_name}", verbose=0),
    ).fit()
    seconds = time.perf_counter() - t0
    best = max(r.metrics["val_accuracy"] for r in grid if r.metrics)
    steps = sum(int(r.metrics["training_iteration"]) for r in grid if r.metrics)
    return best, steps, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=27)
    ap.add_argument("--concurrency", type=int, default=2)
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=args.concurrency, include_dashboard=False, log_to_driver=False)
    data = make_data()
    full_best, full_steps, full_s = run("none", args.epochs, args.concurrency, data)
    asha_best, asha_steps, asha_s = run("asha", args.epochs, args.concurrency, data)
    print(f"full grid: 24 trials x {args.epochs} epochs = {full_steps} epochs, best val accuracy {full_best:.4f}"
          f" ({full_s:.0f} s)")  # fmt: skip
    print(f"ASHA:      {asha_steps} epochs, best val accuracy {asha_best:.4f} ({asha_s:.0f} s)")
    gap = (full_best - asha_best) / full_best
    share = asha_steps / full_steps
    print(f"metric gap {gap * 100:.2f} % (target <= 1 %): {'met' if gap <= 0.01 else 'NOT met'}")
    print(f"epochs used {share * 100:.1f} % of the full grid (target <= 40 %): {'met' if share <= 0.40 else 'NOT met'}")


if __name__ == "__main__":
    main()
