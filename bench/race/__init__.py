"""Time to target loss: every optimizer on a task, the same clock budget, interleaved.

    python -m bench.race                                        # the autoencoder, 600 s each
    python -m bench.race --budget 60 --optimizers adam,locoprop-m-fast,muon
    python -m bench.race --task char-lm --budget 60             # other tasks: --task
    python -m bench.race --tune --budget 60                     # --trials settings per entry
    python -m bench.race --tune --budget-steps 450 --optimizers locoprop-m-fast --trials 8
    python -m bench.race --settings bench/results/race-tune-cpu.json --repeat 2
    make race RACE_ARGS="--budget 600 --repeat 2"

The package: ``tasks`` (model, loss, data, targets of each task), ``peers`` (the optimizers,
each task's entries and tuning grids), ``runner`` (one interleaved race), ``tune`` (tuning
races), ``settings`` (entry settings from defaults, a tuning file and the command line),
``report`` (tables, figure), ``memory`` (RSS probes), ``cli``. Results are written by
``bench.output.write_results``.

What it does (issue 11, issue 18):
- Each entry (``peers.ENTRIES[task]``: an optimizer of ``peers.PEERS`` or of
  ``locoprop_kernels.experiments.optimizers`` with its settings) trains its own copy of the
  task's model (``tasks.TASKS``: the official autoencoder, the MNIST MLP, the Fashion-MNIST
  CNN, a byte-level transformer LM; same init for every entry) for the same training-clock
  budget (``--budget`` seconds).
- Interleaved: all entries live in one process and take turns in slices (``--slice-seconds``
  of their own steps; the starting entry rotates every round). Each entry's clock counts only
  its own steps (batch gather included; CUDA synchronised around every step), so a machine
  whose speed drifts slows them all alike. A slice ends at the first step that crosses the
  slice (or the budget), so an entry may overrun its budget by less than one step.
- Every entry sees the same batches in the same order (a per-epoch shuffle seeded as in
  ``experiments.autoencoder.run_one``); epochs are ceil(train size / batch) steps and
  ``start_epoch`` is called as each begins, so ``locoprop-m`` runs the official schedule (its
  first epoch at lr = 0) on the clock. Time-based schedules (AdamW's cosine, K-FAC's
  damping) read the fraction of the budget spent (``set_progress``).
- Train loss is evaluated on a fixed set (the first ``--eval-size`` training rows) at the
  start, whenever ``--eval-every`` steps or ``--eval-seconds`` of an entry's clock have
  passed since its last evaluation, and at the end; not on the clock. The time to a target
  (``--targets``, default the task's) is the clock at the first evaluation at or below it.
- A run whose loss turns NaN/inf is marked diverged and stops; one whose step raises is marked
  failed; one that improved by less than 2% over the second half of its budget while above
  every target is flagged stalled. None is dropped.
- Memory, per entry: ``state_bytes`` (experiments.optimizers.state_bytes: the tensors the
  method holds beyond its model), and RSS. In one process the peak RSS is shared, so
  ``--memory inprocess`` measures each entry in turn before the race, after the data and every
  model exist: reset the kernel's peak-RSS mark (``/proc/self/clear_refs``), build the method,
  run ``--memory-steps`` steps (timed as training), then record the peak RSS and the RSS kept,
  each above the RSS just before. Memory the allocator kept from earlier entries can be reused
  and not show, so ``--memory isolated`` repeats it in a fresh process per entry (data + one
  model = the baseline); ``both`` (the default) records both. On CUDA the allocator's peak
  above the same baseline is recorded too.
- Tuning (``--tune``): every tuned entry races the same number of settings (``--trials``, a
  seeded sample of its grid ``peers.TUNE_GRIDS[task]``, or the ``--grid-file``'s) on the
  same ``--budget``; the best of
  each (lowest final loss, neither diverged nor failed) goes to ``race-tune-...json``, which
  ``--settings`` reads for the final race. ``--budget-steps N`` instead gives every setting N
  steps (its clock still measured, not its limit): on a shared, loaded machine a clock budget
  shrinks with the load, a step budget does not; the schedules then read steps / N as the
  fraction spent, and the table counts steps to each target.

Output: ``bench/results/race-<name>.json`` for the autoencoder, ``race-<task>-<name>.json``
for the others (configuration, machine, every evaluation, per slice timing), ``.md`` (the
table: per entry seconds to each target, final loss, steps, s/step, state MB, RSS, status;
across ``--repeat`` races 'race 1 / race 2' where they differ) and ``.png`` (loss against
training seconds, log scale). ``--append`` adds this invocation's races to an existing JSON
of the same configuration.
"""
