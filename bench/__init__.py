"""monitor's benchmarks: each against a baseline measured in the same run.

    scripts/bench [--quick] [--only NAME,...] [--methods KEY,...] [--seed N] [--out bench-results/latest.json]

(`scripts/bench` is `python -m bench` from the repository's root, in its .venv.) Every
benchmark is one module here, and reads on its own:

    latency   exit -> `Exited` in a consumer, and -> the line of `monitor events` / `monitor
              wait`, against a minimal C proc-connector listener            bench/latency.py
    storm     two fork storms: watched exits seen, loss, CPU per event      bench/storm.py
    scale     10,000 watched processes: memory, fds, an exit burst          bench/scale.py
    engine    exit -> lock released and committed; 10,000 sessions          bench/engine.py
    daemon    socket round trips, lock ops, `monitor launch`                bench/daemon.py
    notify    exit -> webhook received / subscriber line; stalls; bursts    bench/notify.py
    fleet     exit -> event read from NATS JetStream; a burst of stops      bench/fleet.py
    fork_churn  one tree session's 10,000 forks: daemon CPU, first vs last  bench/fork_churn.py
    machine   what a quiet spell costs: pages touched again, a wake-up      bench/machine.py

A benchmark module has `TITLE`, its own `Sizes` with `FULL` and `QUICK`, `run(ctx) -> dict`
(JSON-able results; `ctx.sizes` is FULL or QUICK) and `tables(result) -> str` (markdown,
through bench.table). Adding one is writing bench/NAME.py and adding "NAME" to BENCHMARKS
below: one line.

What runs in a process of its own (its CPU and memory its alone, no GIL shared with the
harness) is a module too, started as `python -m bench.<role>`: listener (a source under
test), engine_host (an Engine), echo and client (the daemon benchmark's baseline server
and its clients), receiver (a webhook receiver). The shared parts: harness (child
processes, all reaped; the C helpers in bench/c/; the daemon), stats
(`statistics.quantiles`), table (the one table printer), run (the command line), targets
(the project's goals read out of one run or the medians of several: `python -m bench.targets
RUN.json...`, each beside its floor, the same kind of consumer with no monitor code).
"""

BENCHMARKS = ("latency", "storm", "scale", "engine", "daemon", "notify", "fleet", "fork_churn", "machine")
