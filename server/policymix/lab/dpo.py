"""``policymix train dpo``: DPO (TRL) on a base model, LoRA (PEFT) by default, with entanglement diagnostics.

The output folder is a policy the server loads: the adapter (or full weights), the tokenizer,
``policymix.json`` with ``beta`` and the reference (the base), ``entanglement.csv``/``.png`` and
``entanglement_summary.json``. Checkpoints land in ``OUT/checkpoint-N``; ``--resume`` continues the last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .pairs import PairsError, load_pairs

METADATA_FILE = "policymix.json"  # read by policymix.registry (beta, reference)
EXIT_BAD_INPUT = 2


def build_parser(prog: str = "policymix train dpo", description: str = __doc__.splitlines()[0],
                 beta_help: str = "DPO KL coefficient (recorded for DeRa / MOD)") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", required=True, help="base/reference model: HF folder, hub id, .gguf file, or 'embedded'")
    p.add_argument("--pairs", required=True, help="JSONL with prompt, chosen, rejected per line")
    p.add_argument("--out", required=True, help="output folder (the trained policy)")
    p.add_argument("--beta", type=float, default=0.1, help=beta_help)
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True,
                   help="train a LoRA adapter; --no-lora fine-tunes every weight")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default="all-linear", help="'all-linear' or comma-separated module names")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 3e-4 with LoRA, 5e-6 without)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (-1: by epochs)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--max-length", type=int, default=512, help="tokens per prompt+answer (longer ones are cut)")
    p.add_argument("--optim", default="adamw_torch", choices=["adamw_torch", "sgd"])
    p.add_argument("--scheduler", default="linear", choices=["linear", "constant", "cosine"])
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    p.add_argument("--normalized-gradient", action="store_true",
                   help="pairwise normalized gradient: g_w/|g_w| - g_l/|g_l| (arXiv 2410.13828's fix)")
    p.add_argument("--diag-every", type=int, default=1, help="log entanglement diagnostics every N steps (0: off)")
    p.add_argument("--format", default="auto", choices=["auto", "chat", "plain"],
                   help="chat: wrap pairs in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--save-steps", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--log-steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def to_trl_records(records: list[dict], chat: bool) -> list[dict]:
    """Pairs in TRL's preference format: conversational (messages) or plain strings."""
    if not chat:
        return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records]
    return [{
        "prompt": [{"role": "user", "content": r["prompt"]}],
        "chosen": [{"role": "assistant", "content": r["chosen"]}],
        "rejected": [{"role": "assistant", "content": r["rejected"]}],
    } for r in records]


def _check_args(args: argparse.Namespace) -> str | None:
    if not args.beta > 0:
        return "--beta must be > 0"
    if args.batch_size < 1 or args.lora_r < 1 or args.diag_every < 0 or args.save_steps < 1:
        return "--batch-size, --lora-r and --save-steps must be >= 1, --diag-every >= 0"
    if args.lr is not None and not args.lr > 0:
        return "--lr must be > 0"
    return None


@dataclass
class Run:
    """A trainer ready to train, with what ``policymix.json`` needs to know about it."""

    trainer: object  # EntangledDPOTrainer or ARMTrainer (imported lazily: the lab extra is optional)
    out: Path
    base: Path | str
    chat: bool
    lr: float


def build_trainer(args: argparse.Namespace, records: list[dict], kind: str = "dpo") -> Run:
    """Load the base, wrap the pairs for TRL and build the trainer (LoRA unless ``--no-lora``).

    ``kind``: "dpo" (TRL's DPO loss) or "arm" (the reference-free Bradley-Terry loss, ``arm_trainer``).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from .arm_trainer import ARMTrainer
    from .base import resolve_base
    from .trainer import EntangledDPOTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_base(args.base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    chat = args.format == "chat" or (args.format == "auto" and bool(tokenizer.chat_template))
    dataset = Dataset.from_list(to_trl_records(records, chat))
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)

    peft_config = None
    if args.lora:
        from peft import LoraConfig

        targets = args.lora_targets if args.lora_targets == "all-linear" else args.lora_targets.split(",")
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                 target_modules=targets, task_type="CAUSAL_LM")
    lr = args.lr if args.lr is not None else (3e-4 if args.lora else 5e-6)
    config = DPOConfig(
        output_dir=str(out), beta=args.beta, loss_type=["sigmoid"], learning_rate=lr,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        num_train_epochs=args.epochs, max_steps=args.max_steps, max_length=args.max_length,
        optim=args.optim, lr_scheduler_type=args.scheduler, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm, seed=args.seed, data_seed=args.seed,
        logging_steps=args.log_steps, save_strategy="steps", save_steps=args.save_steps, save_total_limit=1,
        report_to="none", bf16=False, fp16=False, gradient_checkpointing=False, disable_dropout=True,
        dataloader_num_workers=0, dataloader_pin_memory=False,
    )
    trainer_class = {"dpo": EntangledDPOTrainer, "arm": ARMTrainer}[kind]
    trainer = trainer_class(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config,
        normalized_gradient=args.normalized_gradient, diag_every=args.diag_every,
        diag_csv=str(out / "entanglement.csv"),
    )
    return Run(trainer=trainer, out=out, base=base, chat=chat, lr=lr)


def run(r: Run, args: argparse.Namespace, records: list[dict], kind: str = "dpo") -> dict:
    """Train (resuming if asked), save the policy and its diagnostics; returns ``policymix.json``'s content."""
    from transformers.trainer_utils import get_last_checkpoint

    from .entanglement import summarize
    from .plots import plot_entanglement

    trainer, out = r.trainer, r.out
    checkpoint = get_last_checkpoint(str(out)) if args.resume else None
    if args.resume and checkpoint is None:
        print(f"no checkpoint in {out}; starting from the base", file=sys.stderr)
    if trainer.diag_log is not None:
        trainer.diag_log.reset(int(checkpoint.rsplit("-", 1)[1]) if checkpoint else None)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    trainer.save_model(str(out))
    trainer.processing_class.save_pretrained(str(out))

    summary = summarize(trainer.diag_log.read()) if trainer.diag_log is not None else {}
    if summary.get("pairs"):
        plot_entanglement(out / "entanglement.csv", out / "entanglement.png",
                          title=f"{out.name}: beta={args.beta}, normalized gradient={args.normalized_gradient}")
        (out / "entanglement_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if kind == "arm":  # a reward model: the base is what it was tuned from, not a reference of its reward
        origin = {"base": str(r.base), "base_spec": args.base}
    else:
        origin = {"reference": str(r.base), "reference_spec": args.base}  # tuned from (and the adapter's base)
    meta = {
        "kind": kind,
        "beta": args.beta,
        **origin,
        "adapter": bool(args.lora),
        "loss": "arm-bradley-terry" if kind == "arm" else "dpo-sigmoid",
        "normalized_gradient": bool(args.normalized_gradient),
        "format": "chat" if r.chat else "plain",
        "pairs": str(Path(args.pairs).resolve()),
        "num_pairs": len(records),
        "steps": trainer.state.global_step,
        "learning_rate": r.lr,
        "train_seconds": round(seconds, 1),
        "entanglement": summary,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def main(argv: list[str], kind: str = "dpo", parser: argparse.ArgumentParser | None = None) -> int:
    """Entry point of ``policymix train dpo`` (and ``train arm``); returns the process exit code."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    problem = _check_args(args)
    if problem:
        print(f"{parser.prog}: error: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        records = load_pairs(args.pairs)  # before any model is loaded: a bad file never reaches step 1
    except PairsError as err:
        print(f"{parser.prog}: error: {err.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    meta = run(build_trainer(args, records, kind), args, records, kind)
    ent = meta["entanglement"]
    line = f"saved {args.out}: {meta['steps']} steps in {meta['train_seconds']} s, beta={meta['beta']}"
    if ent.get("pairs"):
        line += (f"; ideal case measured {ent['measured']['ideal']:.0%} of {ent['pairs']} logged pairs"
                 f" (pair-alone first order {ent['predicted_pair_alone']['ideal']:.0%})")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
