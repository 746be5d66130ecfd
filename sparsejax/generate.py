"""Generate text from a trained run or an imported Hugging Face checkpoint, with a KV cache.

    python -m sparsejax.generate --workdir RUN [--step N] (--prompt TEXT | --prompt-file F)...
        [--max-new-tokens 64] [--temperature 0] [--top-p 1] [--seed 0]
        [--ffn dense|sparse] [--decode-kernel auto|xla|cpu] [--capacity K] [--threshold EPS]
        [--calibration-batches 2]
    python -m sparsejax.generate --hf PATH (--prompt TEXT | --prompt-file F)... [...] [--dtype float32]

Each ``--prompt`` / ``--prompt-file`` (a file's whole text) is one row of a batch; rows of
different lengths are left-padded (:mod:`sparsejax.decode`). Temperature 0 is greedy; above it,
nucleus sampling at ``--top-p``, reproducible from ``--seed``. With one prompt the tokens are
streamed to the console as they are generated; with several, each row is printed when done. The
last line gives decode tokens/s (all rows, prefill excluded).

``--ffn sparse`` decodes with the sparse FFN of :mod:`sparsejax.decode_ffn`: for activations with
exact zeros (or a trained top-k) it equals dense decoding. ``--decode-kernel`` picks how it reads the active rows:
``cpu``, the C++ row reader (:mod:`sparsejax.kernels.cpu_decode`, float32, built on first use;
no capacity), or ``xla``, XLA's gather into a capacity (a step with more active neurons than
``--capacity`` runs dense; by default per layer the most neurons any validation token activates
there — a calibration pass — times the batch size, since a step reads the union of its rows'
neurons); ``auto`` (default) takes ``cpu`` where it runs and says why not otherwise. For
activations without zeros neurons with |σ(gate)| below ``--threshold`` (FAT-ε) are dropped, and
the loss change this costs on validation text is printed first.

Read-only on the run directory, like eval.py: parameters are restored without an optimizer and
nothing is written there. Exit codes: 0 done, 1 error, 2 bad arguments or input (one line).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
from typing import Callable


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        print(f"generate error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="run directory written by train.py")
    source.add_argument("--hf", help="local Hugging Face checkpoint directory (LLaMA, Mistral, MiniCPM)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    prompt.add_argument("--prompt-file", dest="prompt_file", action="append",
                        help="UTF-8 file whose text is one prompt (repeat for a batch)")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", dest="top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ffn", default="dense", help="decode-time FFN: dense or sparse")
    p.add_argument("--decode-kernel", dest="decode_kernel", default="auto",
                   help="sparse FFN row reader: auto (default), cpu (C++) or xla (gather)")
    p.add_argument("--capacity", type=int, default=0,
                   help="sparse FFN with --decode-kernel xla: neurons read per token and layer "
                        "(0: calibrated)")
    p.add_argument("--threshold", type=float, default=None,
                   help="sparse FFN for activations without zeros: FAT-ε on |σ(gate)| (default 0.01)")
    p.add_argument("--calibration-batches", dest="calibration_batches", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="--hf compute and parameter dtype")
    return p.parse_args(argv)


@dataclasses.dataclass
class Loaded:
    """What generation needs, from a run or an HF checkpoint."""

    cfg: object  # sparsejax.config.Config
    params: object
    sparsity: object  # sparsejax.sparsity.Sparsity: the trained model's input
    tokenizer: object  # .encode(text) -> ids, .decode(ids) -> text
    bos_id: int | None = None
    eos_id: int | None = None
    # () -> validation batches for the capacity calibration and the loss change, read on first
    # call (only a sparse decode that needs them reads them)
    calibration: Callable[[], list] | None = None


class InputError(ValueError):
    pass


def _run_tokenizer(cfg):
    """The run's tokenizer, through the data package's loader. A SentencePiece model trained on
    TFDS or text-file data is found by that training text, which generation does not read."""
    from sparsejax import data

    d = cfg.data
    if d.tokenizer == "sentencepiece" and not d.tokenizer_path and d.source != "embedded":
        raise InputError(f"data.tokenizer={d.tokenizer!r} with data.source={d.source!r}: the "
                         f"run's tokenizer cannot be rebuilt here; allowed: 'byte', a "
                         f"data.tokenizer_path, or sentencepiece over the embedded corpus")
    return data.run_tokenizer(cfg)


def _single_device_plan(cfg):
    import jax

    from sparsejax import sharding

    return sharding.plan(cfg.mesh, jax.devices()[:1])


def load_run(args) -> Loaded:
    from sparsejax import data, trained_run
    from sparsejax.sparsity_plan import SparsityPlan

    run = trained_run.load(args.workdir)
    step = run.steps[-1] if args.step is None else args.step
    if step not in run.steps:
        raise trained_run.RunError(f"--step {step} not found; available: {run.steps}")
    tokenizer = _run_tokenizer(run.cfg)
    cfg = dataclasses.replace(run.cfg, mesh=dataclasses.replace(run.cfg.mesh, data=1, fsdp=1,
                                                                tensor=1))
    run.cfg = cfg
    params, _ = run.params(step, _single_device_plan(cfg).mesh)
    plan = SparsityPlan.of(cfg)
    sparsity = plan.model_input(plan.coefficients(step) if plan.traced else None)
    eval_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, eval_batches=args.calibration_batches))
    calibration = functools.cache(lambda: data.validation_batches(eval_cfg, tokenizer=tokenizer))
    return Loaded(cfg, params, sparsity, tokenizer, calibration=calibration)


def load_hf(args) -> Loaded:
    from sparsejax import data, hf_import

    path = pathlib.Path(args.hf)
    hf = hf_import.read_config(path)
    context = int(hf.get("max_position_embeddings") or 2048)
    if hf.get("sliding_window"):
        context = min(context, int(hf["sliding_window"]))
    ckpt = hf_import.open_checkpoint(path, seq_len=context, dtype=args.dtype)
    tokenizer = data.load_tokenizer(path, field="--hf")
    params = hf_import.load_params(ckpt)
    cfg = hf_import.run_config(ckpt.model, f"hf_{path.resolve().name}", batch_size=1,
                               seq_len=min(context, 256), eval_batches=args.calibration_batches)
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    @functools.cache
    def calibration():
        seq = min(context, 256)
        text = data.split_text(data.load_corpus_text(), 0.05)[1]
        tokens = data.encode_prefix(tokenizer, text, args.calibration_batches * (seq + 1))
        return data.sequential_batches(tokens, 1, seq, args.calibration_batches,
                                       bos_id=hf.get("bos_token_id"), overlap=False,
                                       what="the calibration text")
    from sparsejax.sparsity import Sparsity

    return Loaded(cfg, params, Sparsity(), tokenizer, bos_id=hf.get("bos_token_id"), eos_id=eos,
                  calibration=calibration)


def _prompts(args) -> list[str]:
    if args.prompt is not None:
        return list(args.prompt)
    texts = []
    for f in args.prompt_file:
        try:
            texts.append(pathlib.Path(f).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"--prompt-file {f} cannot be read as UTF-8 text "
                             f"({getattr(err, 'strerror', None) or err})") from None
    return texts


def sparse_setup(loaded: Loaded, args, n_tokens: int, kernel: str) -> tuple[object, int, str]:
    """(sparsity input, step capacity, a report line) of ``--ffn sparse`` with the row reader
    ``kernel`` (0 for a reader without a capacity)."""
    from sparsejax import decode, decode_ffn, model as model_lib
    from sparsejax.eval_options import EvalOptions

    cfg, sp = loaded.cfg.model, loaded.sparsity
    if why := decode_ffn.unsupported(cfg):
        raise InputError(f"--ffn sparse: {why}")
    model = model_lib.Model(cfg)
    lines = []
    if not decode_ffn.exact_zeros(cfg, sp):
        eps = EvalOptions().fat_eps if args.threshold is None else args.threshold
        if eps < 0:
            raise InputError(f"--threshold={eps} must be >= 0")
        sp = sp.replace(thresholds=decode.fat_thresholds(cfg, eps), mask_target="activation")
        dense_loss, sparse_loss = decode.loss_change(model, loaded.params, loaded.calibration(),
                                                     loaded.sparsity, sp.thresholds)
        lines.append(f"thresholded sparse FFN (model.activation={cfg.activation!r} has no exact "
                     f"zeros): FAT-eps {eps:g}; validation loss {dense_loss:.4f} -> "
                     f"{sparse_loss:.4f} ({sparse_loss - dense_loss:+.4f})")
    if not decode_ffn.DECODE_KERNELS[kernel].capacity:
        return sp, 0, "\n".join(lines)
    if args.capacity:
        per_token = args.capacity
    else:
        per_token = tuple(int(c) for c in decode.calibrate(model, loaded.params,
                                                          loaded.calibration(), sp))
        lines.append(f"capacity per layer {list(per_token)} of d_ff {cfg.d_ff} per token "
                     f"(calibrated: the most active neurons of a validation token)")
    capacity = decode.capacity_for(per_token, n_tokens, cfg.d_ff)
    return sp, capacity, "\n".join(lines)


def _text(capacity) -> str:
    return str(list(capacity)) if isinstance(capacity, tuple) else str(capacity)


def main(argv=None) -> int:
    args = parse_args(argv)
    from sparsejax import lifecycle

    lifecycle.quiet_console()
    from sparsejax import config, data, decode, decode_ffn, hf_import, trained_run

    try:
        if args.ffn not in decode_ffn.decode_ffn_names():
            raise InputError(f"--ffn={args.ffn!r}; allowed: {decode_ffn.decode_ffn_names()}")
        if args.decode_kernel not in decode_ffn.kernel_names():
            raise InputError(f"--decode-kernel={args.decode_kernel!r}; allowed: "
                             f"{decode_ffn.kernel_names()}")
        for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1),
                                 ("--calibration-batches", args.calibration_batches, 1),
                                 ("--capacity", args.capacity, 0)):
            if value < low:
                raise InputError(f"{flag}={value} must be >= {low}")
        if args.temperature < 0 or not 0 < args.top_p <= 1:
            raise InputError(f"--temperature={args.temperature} must be >= 0 and "
                             f"--top-p={args.top_p} in (0, 1]")
        if args.hf and args.step is not None:
            raise InputError("--step applies to --workdir runs only")
        texts = _prompts(args)
        loaded = load_hf(args) if args.hf else load_run(args)
        prompts = []
        for text in texts:
            ids = list(map(int, loaded.tokenizer.encode(text)))
            prompts.append(([loaded.bos_id] if loaded.bos_id is not None else []) + ids)
        if any(max(p, default=0) >= loaded.cfg.model.vocab_size for p in prompts):
            raise InputError(f"the tokenizer gives ids >= model.vocab_size="
                             f"{loaded.cfg.model.vocab_size}: it does not belong to this model")
        sp, capacity, ffn, kernel = loaded.sparsity, 0, args.ffn, "auto"
        if ffn == "sparse":
            kernel, why = decode_ffn.resolve_kernel(args.decode_kernel, loaded.cfg.model)
            if why:
                print(f"{why}; using {kernel!r}", file=sys.stderr)
            sp, capacity, report = sparse_setup(loaded, args, len(prompts), kernel)
            if report:
                print(report, file=sys.stderr)
        decoder = decode.Decoder(loaded.cfg.model, loaded.params, sp)
        import numpy as np

        tokens_so_far: list[int] = []
        printed = [""]

        def stream(token_B):
            tokens_so_far.append(int(token_B[0]))
            text = loaded.tokenizer.decode(tokens_so_far)
            if text.startswith(printed[0]):
                sys.stdout.write(text[len(printed[0]):])
                sys.stdout.flush()
                printed[0] = text

        if len(prompts) == 1:
            sys.stdout.write(texts[0])
        result = decoder.generate([np.asarray(p) for p in prompts], args.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                  ffn=ffn, capacity=capacity, kernel=kernel,
                                  stop_id=loaded.eos_id,
                                  on_tokens=stream if len(prompts) == 1 else None)
    except (InputError, decode.DecodeError, decode_ffn.KernelError, trained_run.RunError,
            hf_import.HfImportError, data.DataError) as err:
        print(f"generate error: {err}", file=sys.stderr)
        return 2
    except config.ConfigError as err:
        print(f"generate error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    if len(prompts) == 1:
        sys.stdout.write("\n")
    else:
        for i, (text, row) in enumerate(zip(texts, result.tokens)):
            print(f"[{i}] {text}{loaded.tokenizer.decode(row)}")
    print(f"{result.decode_steps * len(prompts)} tokens in {result.decode_s:.3f} s: "
          f"{result.tokens_per_s:.1f} tokens/s (decode, batch {len(prompts)}, ffn {ffn}"
          f"{f', kernel {kernel}' if ffn == 'sparse' else ''}"
          f"{f', capacity {_text(capacity)}' if capacity else ''}; prefill of "
          f"{max(len(p) for p in prompts)} tokens {result.prefill_s:.3f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
