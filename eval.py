#!/usr/bin/env python
"""Measure the activation sparsity of a trained run, checkpoint by checkpoint, or of a Hugging
Face checkpoint (LLaMA, Mistral or MiniCPM architecture; sparsejax/hf_import.py).

    python eval.py --workdir runs/tiny_relu [--checkpoints all|last|STEP,...]
                   [--metrics zero,fat,topk,topk_global,cett,cett_ppl] [--p 1] [--out results.json]
    python eval.py --hf PATH [--text FILE] [--seq-len 512] [--batch-size 4] [--eval-batches 4]
                   [--dtype float32|bfloat16] [--metrics ...] [--out results.json]

--hf reads a local checkpoint directory (config.json, *.safetensors, tokenizer.json) and
evaluates it on --text (default: the embedded corpus's validation split) with the same passes;
default output runs/hf_<dir name>/eval/results.json. An unsupported architecture or option is
one line naming the config.json key and value, exit 2; so is a model that will not fit in free
memory (checked before loading), and a tensor holding NaN or infinity. Options of the other
source (--text, --seq-len, --batch-size, --dtype with --workdir; --checkpoints, --joint-last
with --hf) would be ignored, so they are refused (exit 2). Each checkpoint of a run is evaluated
with the model and sparsity settings of its own meta (what it was trained with).

Writes results.json (per checkpoint, per metric: mean and per-layer activation ratio, loss and
perplexity ratio of the sparse pass, dead neurons, chunk-level sparsity, magnitude histograms),
results.csv (tidy rows) and PNG plots next to it (default: WORKDIR/eval/results.json).
Definitions: docs/sparsity_metrics_and_laws.md (Sparsing Law paper); see sparsejax/evaluation.py.
Read-only on the run: safe while its trainer is still writing checkpoints.
Exit codes: 0 done, 1 error, 2 bad arguments or a missing/incompatible workdir (nothing written).
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from sparsejax import eval_metrics
    from sparsejax.eval_options import FLAGS, EvalOptions, argument_type, flag_value, help_text

    d = EvalOptions()  # the one place evaluation defaults live
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=metrics_epilog(eval_metrics.METRICS.values()))
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="run directory written by train.py")
    source.add_argument("--hf", help="local Hugging Face checkpoint directory (LLaMA, Mistral, MiniCPM)")
    hf = p.add_argument_group("--hf options")
    hf.add_argument("--text", default=None, help="UTF-8 text file to evaluate on (default: the "
                    "embedded corpus's validation split)")
    hf.add_argument("--seq-len", dest="seq_len", type=int, default=512, help="tokens per row (default 512)")
    hf.add_argument("--batch-size", dest="batch_size", type=int, default=4, help="rows per batch (default 4)")
    hf.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="compute and parameter dtype (default float32)")
    p.add_argument("--checkpoints", default="all", help="all, last, or comma-separated steps")
    # Every evaluation setting: its flag, type and help are the EvalOptions field's own.
    for field, flag in FLAGS.items():
        default = getattr(d, field)
        if field == "metrics":
            default = flag_value(field, default)
        p.add_argument(flag, dest=field, type=argument_type(field), default=default,
                       help=f"{help_text(field)} (default {default})")
    p.add_argument("--out", default=None, help="results JSON path (default WORKDIR/eval/results.json)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    # Which options were given (not left at their defaults): parsed again with no defaults.
    p.set_defaults(**{a.dest: None for a in p._actions if a.dest != "help"})
    given = {dest for dest, value in vars(p.parse_args(argv)).items() if value is not None}
    args.misplaced = [flag for dest, flag in (WORKDIR_ONLY if args.hf else HF_ONLY).items()
                      if dest in given]
    return args


def metrics_epilog(metrics) -> str:
    """eval.py's list of the registered metrics, each with its line and the flags it reads."""
    from sparsejax.eval_options import FLAGS

    import textwrap

    lines = ["metrics (--metrics):"]
    for m in metrics:
        flags = f" [{' '.join(FLAGS[o] for o in m.options)}]" if m.options else ""
        lines += textwrap.wrap(f"{m.name:<12} {m.help}{flags}", 96, initial_indent="  ",
                               subsequent_indent=" " * 15, break_on_hyphens=False)
    return "\n".join(lines)


# Options that mean something for one source only: given with the other, they would be
# silently ignored, so they are refused (exit 2).
HF_ONLY = {"text": "--text", "seq_len": "--seq-len", "batch_size": "--batch-size",
           "dtype": "--dtype"}
WORKDIR_ONLY = {"checkpoints": "--checkpoints", "joint_last": "--joint-last"}


def main(argv=None) -> int:
    args = parse_args(argv)
    from sparsejax import lifecycle

    lifecycle.die_with_parent()  # started by a sweep: end with it
    # Library warnings (absl, orbax) stay off the console; our own messages are printed. So do
    # the tracebacks orbax's background tasks print after a damaged checkpoint failed to read.
    lifecycle.quiet_console()
    import pathlib

    from sparsejax import (config, eval_options, evaluation, plotting, results as results_lib, rundir,
                           trained_run)

    if args.out:
        out = pathlib.Path(args.out)
    elif args.hf:
        out = rundir.RunDir(pathlib.Path("runs") / f"hf_{pathlib.Path(args.hf).resolve().name}").eval_results
    else:
        out = rundir.RunDir(pathlib.Path(args.workdir)).eval_results
    try:
        if args.misplaced:
            source, other = ("--hf", "--workdir") if args.hf else ("--workdir", "--hf")
            raise eval_options.EvalError(
                f"{', '.join(args.misplaced)} {'does' if len(args.misplaced) == 1 else 'do'} not "
                f"apply to {source} (only to {other}); leave {'it' if len(args.misplaced) == 1 else 'them'} out")
        # Before any compute: a results path that cannot be written fails now, not after the run.
        if out.is_dir():
            raise eval_options.EvalError(f"--out {out} is a directory; give a file path such as {out / 'results.json'}")
        rundir.check_writable_dir(out.parent, "--out directory")
    except (eval_options.EvalError, rundir.RunDirError) as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    from sparsejax import data, hf_import

    try:
        options = eval_options.from_flags({f: getattr(args, f) for f in eval_options.FLAGS})
        if args.hf:
            results = evaluate_hf(args, options)
        else:
            results = evaluation.evaluate_run(args.workdir, options, checkpoints=args.checkpoints,
                                              progress=args.progress)
    except (trained_run.RunError, eval_options.EvalError, hf_import.HfImportError,
            data.DataError) as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    except config.ConfigError as err:  # e.g. the run's mesh needs more devices than this host has
        print(f"eval error: the run's config does not fit this machine: {str(err).splitlines()[0]}",
              file=sys.stderr)
        return 2
    import jax

    if jax.process_index() == 0:
        try:
            written = results_lib.write_results(results, out)
            written += plotting.plot_eval_results(results, out.with_suffix(""))
        except OSError as err:
            print(f"eval error: writing {out} failed: {err.strerror or err}", file=sys.stderr)
            return 1
        print(results_lib.summary_table(results))
        for path in written:
            print(f"wrote {path}")
    return 0


def evaluate_hf(args: argparse.Namespace, options) -> dict:
    """The --hf path: check the checkpoint and the memory it needs, then load it and run the
    passes of a trained run's evaluation on batches of --text."""
    import pathlib

    from sparsejax import data, eval_options, evaluation, hf_import, resources

    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        if value < 1:
            raise eval_options.EvalError(f"{flag}={value} must be >= 1")
    import jax

    ckpt = hf_import.open_checkpoint(args.hf, seq_len=args.seq_len, dtype=args.dtype)
    devices = jax.device_count()
    if args.batch_size % devices:
        raise eval_options.EvalError(f"--batch-size={args.batch_size} must be a multiple of the "
                                     f"{devices} devices the batch is split over")
    tokenizer = data.load_tokenizer(args.hf, field="--hf")
    if args.text is None:
        text = data.split_text(data.load_corpus_text(), 0.05)[1]
    else:
        try:
            text = pathlib.Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise eval_options.EvalError(f"--text {args.text} cannot be read as UTF-8 text "
                                         f"({getattr(err, 'strerror', None) or err})") from None
    n_batches = options.eval_batches or 4
    bos = ckpt.hf_config.get("bos_token_id")
    need = n_batches * args.batch_size * (args.seq_len + (bos is None))
    tokens = data.encode_prefix(tokenizer, text, need)
    if len(tokens) and int(tokens.max()) >= ckpt.model.vocab_size:
        raise hf_import.HfImportError(
            f"{tokenizer.model_path} gives token id {int(tokens.max())} >= config.json vocab_size="
            f"{ckpt.model.vocab_size}: the tokenizer does not belong to this model")
    try:  # disjoint rows, each [BOS] + seq_len tokens when the model has a BOS token
        batches = data.sequential_batches(tokens, args.batch_size, args.seq_len, n_batches,
                                          bos_id=bos, overlap=False, what="the text")
    except data.DataError as err:
        raise hf_import.HfImportError(f"{err}; give a longer --text or lower --batch-size / "
                                      f"--seq-len") from None
    eval_tokens = len(batches) * args.batch_size * args.seq_len
    hf_import.check_memory(
        hf_import.memory_need_bytes(ckpt, batch_size=args.batch_size, seq_len=args.seq_len,
                                    eval_tokens=eval_tokens, max_cache_gib=options.max_cache_gib),
        resources.host_available_bytes())
    if args.progress:
        print(f"{ckpt.path}: {ckpt.hf_config.get('model_type')}, "
              f"{hf_import.n_params_human(ckpt.n_params)} parameters, {args.dtype}; "
              f"{len(batches)} batches x {args.batch_size} x {args.seq_len} tokens")
    params = hf_import.load_params(ckpt, progress=args.progress)
    cfg = hf_import.run_config(ckpt.model, f"hf_{ckpt.path.resolve().name}",
                               batch_size=args.batch_size, seq_len=args.seq_len,
                               eval_batches=len(batches))
    results = evaluation.evaluate(hf_import.HfRun(ckpt, cfg, params), options,
                                  progress=args.progress, batches=batches,
                                  batch_progress=args.progress)
    results["hf"] = {"path": str(ckpt.path), "model_type": ckpt.hf_config.get("model_type"),
                     "params": ckpt.n_params, "dtype": args.dtype, "seq_len": args.seq_len,
                     "text": args.text or "embedded corpus validation split"}
    return results


if __name__ == "__main__":
    sys.exit(main())
