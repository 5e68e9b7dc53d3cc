"""`bigmodel train`: train the text classifier, test after each epoch, checkpoint, resume.

One process trains on the CPU or one GPU. Under ``torchrun --nproc_per_node=N`` the same command
trains with DistributedDataParallel (gloo on the CPU, nccl on GPUs): every rank holds the same
global length-bucketed batches and takes its share, the test set is split across ranks and the
counts summed, and rank 0 alone prints, writes checkpoints and the ``--json`` file.

Errors in the data or the checkpoint end the command with one line on stderr and exit code 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from ..data import (
    FORMATS,
    BucketBatchSampler,
    Corpus,
    DataError,
    TextDataset,
    Vocab,
    encode_texts,
    load_corpus,
    pad_batch,
    tokenize,
)
from ..models import BACKENDS, POOLINGS, TextClassifier

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "bigmodel-train-checkpoint-v1"

# What defines a run: saved in the checkpoint, taken from it on --resume, and an error to contradict.
RUN_DEFAULTS: dict[str, Any] = {
    "data": None,
    "format": None,
    "text_column": "text",
    "label_column": "label",
    "max_len": 400,
    "min_freq": 2,
    "max_vocab": 50_000,
    "embed_dim": 100,
    "hidden_dim": 200,
    "layers": 1,
    "bidirectional": False,
    "attention": False,
    "heads": 4,
    "pooling": "last",
    "dropout": 0.5,
    "batch_size": 64,
    "lr": 1e-3,
    "grad_clip": 5.0,
    "seed": 0,
    "amp": False,
}
# Settings added after checkpoints were first written: such a checkpoint ran with their default.
ADDED_SETTINGS = ("amp",)


class TrainError(Exception):
    """The command cannot go on; the message is one line that says what and where."""


class CheckpointError(TrainError):
    """The checkpoint cannot be used."""


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    run = parser.add_argument_group(
        "run settings",
        "saved in the checkpoint; on --resume, omitted ones come from it and given ones must match",
    )
    run.add_argument("--data", metavar="PATH", help="corpus path (default: the built-in synthetic corpus)")
    run.add_argument("--format", choices=FORMATS, help="corpus format (default: detected from the layout)")
    run.add_argument("--text-column", metavar="NAME", help="CSV text column (default: text)")
    run.add_argument("--label-column", metavar="NAME", help="CSV label column (default: label)")
    run.add_argument(
        "--max-len", type=int, metavar="N", help="keep the first N tokens of a text (default: 400)"
    )
    run.add_argument(
        "--min-freq", type=int, metavar="N", help="vocabulary: tokens seen N+ times (default: 2)"
    )
    run.add_argument("--max-vocab", type=int, metavar="N", help="vocabulary size bound (default: 50000)")
    run.add_argument("--embed-dim", type=int, metavar="N", help="embedding size (default: 100)")
    run.add_argument("--hidden-dim", type=int, metavar="N", help="LSTM hidden size (default: 200)")
    run.add_argument("--layers", type=int, metavar="N", help="LSTM layers (default: 1)")
    run.add_argument("--bidirectional", action=argparse.BooleanOptionalAction, help="bidirectional LSTM")
    run.add_argument(
        "--attention", action=argparse.BooleanOptionalAction, help="self-attention over the LSTM"
    )
    run.add_argument("--heads", type=int, metavar="N", help="attention heads (default: 4)")
    run.add_argument("--pooling", choices=POOLINGS, help="sequence pooling (default: last)")
    run.add_argument("--dropout", type=float, metavar="P", help="dropout (default: 0.5)")
    run.add_argument(
        "--batch-size", type=int, metavar="N", help="examples per batch and process (default: 64)"
    )
    run.add_argument("--lr", type=float, metavar="X", help="Adam learning rate (default: 0.001)")
    run.add_argument(
        "--grad-clip", type=float, metavar="X", help="gradient norm bound, 0 for none (default: 5)"
    )
    run.add_argument("--seed", type=int, metavar="N", help="seed of data split, init, batching (default: 0)")
    run.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        help="mixed precision: forward passes under bfloat16 autocast, on the CPU or CUDA; parameters, "
        "gradients and Adam stay float32 (default: off)",
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default="fused", help="LSTM implementation (default: fused)"
    )
    parser.add_argument(
        "--epochs", type=int, default=5, metavar="N", help="train until N epochs are done (default: 5)"
    )
    parser.add_argument("--out", metavar="DIR", help=f"write DIR/{CHECKPOINT_NAME} after each epoch")
    parser.add_argument(
        "--resume", action="store_true", help=f"continue from DIR/{CHECKPOINT_NAME} (needs --out)"
    )
    parser.add_argument("--json", metavar="FILE", help="write the per-epoch results as JSON")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads per process")
    parser.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available"
    )


# ---- processes ----


@dataclass
class Ranks:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: CUDA is not available on this machine")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def launched_world_size() -> int:
    """The number of processes torchrun started for this run (WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _start_processes(device_choice: str) -> Ranks:
    """The rank and device of this process; joins the process group when started by torchrun."""
    world_size = launched_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_choice, local_rank)
    if world_size == 1:
        return Ranks(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def _sum_across_ranks(ranks: Ranks, values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    if ranks.distributed:
        dist.all_reduce(t)
    return t.tolist()


def _gather(ranks: Ranks, obj: Any) -> list[Any]:
    if not ranks.distributed:
        return [obj]
    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, obj)
    return out


# ---- files ----


def _atomic_write(path: Path, write) -> None:
    """``write(file)`` into a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume (train without --resume first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for a damaged file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: corrupt or not a checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a bigmodel train checkpoint")
    missing = [
        k for k in ("config", "vocab", "model", "optimizer", "epoch", "history", "rng") if k not in ckpt
    ]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {missing}")
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["rng"], list) or not ckpt["rng"]:
        raise CheckpointError(f"{path}: damaged checkpoint (config or RNG states malformed)")
    return ckpt


def _resolve_config(args: argparse.Namespace, saved: dict | None, ckpt_path: Path | None) -> dict:
    """The run settings: the command's, else the checkpoint's, else the defaults."""
    given = {key: getattr(args, key) for key in RUN_DEFAULTS}
    if given["data"] is not None:
        given["data"] = str(Path(given["data"]).resolve())
    if saved is None:
        return {key: RUN_DEFAULTS[key] if value is None else value for key, value in given.items()}
    saved = {**{k: RUN_DEFAULTS[k] for k in ADDED_SETTINGS}, **saved}
    unknown = sorted(set(RUN_DEFAULTS) ^ set(saved))
    if unknown:
        raise CheckpointError(f"{ckpt_path}: checkpoint settings do not match this version ({unknown})")
    clashes = [
        f"--{key.replace('_', '-')} {value} (checkpoint: {saved[key]})"
        for key, value in given.items()
        if value is not None and value != saved[key]
    ]
    if clashes:
        raise CheckpointError(f"{ckpt_path}: the checkpoint was trained otherwise: {'; '.join(clashes)}")
    return dict(saved)


def weights_digest(model: nn.Module) -> str:
    """sha256 over the parameter and buffer names and bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---- training ----


def _loader(dataset: TextDataset, sampler: BucketBatchSampler) -> DataLoader:
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_batch)


def _autocast(ranks: Ranks, amp: bool) -> torch.autocast:
    """--amp: bfloat16 autocast on the run's device (parameters and optimizer stay float32)."""
    return torch.autocast(ranks.device.type, dtype=torch.bfloat16, enabled=amp)


def _clip_gradients(parameters, max_norm: float) -> None:
    """``nn.utils.clip_grad_norm_``, bit for bit, without its multiply when nothing is clipped: PyTorch
    scales every gradient by ``min(1, max_norm / (norm + 1e-6))`` even when that is exactly 1 (on MR
    no batch of 240 clipped, and the multiply cost 0.2-1.5 ms per batch, NOTES v24). On CPU the
    comparison reads the norm; elsewhere (a device sync) PyTorch's multiply stays."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return
    norm = nn.utils.get_total_norm([p.grad for p in params])
    # A NaN norm fails `>= 1` and clips, which makes every gradient NaN, as clip_grad_norm_ does.
    if norm.device.type == "cpu" and bool(max_norm / (norm + 1e-6) >= 1.0):
        return
    nn.utils.clip_grads_with_norm_(params, max_norm, norm)


def _train_epoch(model, core: TextClassifier, optimizer, loader, config, ranks, desc: str) -> dict:
    from tqdm import tqdm

    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=ranks.device)
    examples = tokens = 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=None if ranks.is_main else True)
    for step, (ids, lengths, labels) in enumerate(bar, 1):
        ids, labels = ids.to(ranks.device), labels.to(ranks.device)
        lengths = lengths.to(ranks.device)
        with _autocast(ranks, config["amp"]):
            loss = core.loss(model(ids, lengths), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config["grad_clip"] > 0:
            _clip_gradients(model.parameters(), config["grad_clip"])
        optimizer.step()
        loss_sum += loss.detach() * len(labels)
        examples += len(labels)
        tokens += int(lengths.sum())
        if step % 10 == 0 and not bar.disable:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{loss_sum.item() / examples:.4f}", tok_s=f"{tokens / elapsed:,.0f}")
    if ranks.device.type == "cuda":
        torch.cuda.synchronize(ranks.device)
    seconds = time.perf_counter() - start
    loss_total, examples, tokens = _sum_across_ranks(ranks, [loss_sum.item(), examples, tokens])
    seconds = max(_gather(ranks, seconds))
    return {"loss": loss_total / examples, "epoch_seconds": seconds, "tokens_per_second": tokens / seconds}


@torch.no_grad()
def _evaluate(core: TextClassifier, loader, ranks, amp: bool) -> float:
    core.eval()
    correct = total = 0
    for ids, lengths, labels in loader:
        ids, labels = ids.to(ranks.device), labels.to(ranks.device)
        lengths = lengths.to(ranks.device)
        with _autocast(ranks, amp):
            logits = core(ids, lengths)
        correct += int((core.predict(logits) == labels).sum())
        total += len(labels)
    correct, total = _sum_across_ranks(ranks, [correct, total])
    return correct / total


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _log(ranks: Ranks, message: str) -> None:
    if ranks.is_main:
        print(message, flush=True)


def _prepare_data(
    config: dict, ckpt: dict | None, ckpt_path: Path | None, ranks: Ranks
) -> tuple[Corpus, Vocab, TextDataset, TextDataset]:
    """The corpus, the vocabulary (the checkpoint's on resume) and both splits encoded."""
    corpus = load_corpus(
        config["data"],
        config["format"],
        seed=config["seed"],
        text_column=config["text_column"],
        label_column=config["label_column"],
    )
    for note in corpus.notes:
        if ranks.is_main:
            print(f"bigmodel train: note: {note}", file=sys.stderr)
    train_tokens = [tokenize(t) for t in corpus.train.texts]
    if ckpt is not None:
        try:
            vocab = Vocab(ckpt["vocab"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt_path}: bad vocabulary ({e})") from None
    else:
        vocab = Vocab.build(train_tokens, config["min_freq"], config["max_vocab"])
    train_set = TextDataset(encode_texts(train_tokens, vocab, config["max_len"]), corpus.train.labels)
    test_tokens = (tokenize(t) for t in corpus.test.texts)
    test_set = TextDataset(encode_texts(test_tokens, vocab, config["max_len"]), corpus.test.labels)
    return corpus, vocab, train_set, test_set


def _build_model(
    config: dict, backend: str, vocab_size: int, num_classes: int, pad_id: int, ranks: Ranks
) -> tuple[TextClassifier, torch.optim.Optimizer]:
    torch.manual_seed(config["seed"])
    model = TextClassifier(
        vocab_size,
        config["embed_dim"],
        config["hidden_dim"],
        config["layers"],
        config["bidirectional"],
        num_classes=num_classes,
        attention=config["attention"],
        num_heads=config["heads"],
        pooling=config["pooling"],
        dropout=config["dropout"],
        backend=backend,
        padding_idx=pad_id,
    ).to(ranks.device)
    # The fused (single-kernel) Adam: with the embedding table, the step is a visible part of an epoch.
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"], fused=True)
    return model, optimizer


def _restore(ckpt: dict, ckpt_path: Path, model: nn.Module, optimizer, ranks: Ranks) -> None:
    """Model, optimizer and this rank's RNG state from the checkpoint."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        states = ckpt["rng"]
        _set_rng_state(states[ranks.rank % len(states)], ranks.device)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        reason = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{ckpt_path}: does not fit the model ({reason})") from None


def _train(args: argparse.Namespace, ranks: Ranks) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.epochs < 1:
        raise TrainError(f"--epochs must be >= 1, got {args.epochs}")
    if args.resume and args.out is None:
        raise CheckpointError("--resume needs --out DIR, the directory holding the checkpoint")
    ckpt_path = Path(args.out) / CHECKPOINT_NAME if args.out is not None else None
    ckpt = None
    if args.resume:
        ckpt = _load_checkpoint(ckpt_path)
    elif ckpt_path is not None and ckpt_path.exists():
        raise CheckpointError(f"{ckpt_path}: a checkpoint is already there; pass --resume or another --out")
    config = _resolve_config(args, ckpt["config"] if ckpt else None, ckpt_path)

    corpus, vocab, train_set, test_set = _prepare_data(config, ckpt, ckpt_path, ranks)
    core, optimizer = _build_model(config, args.backend, len(vocab), corpus.num_classes, vocab.pad_id, ranks)
    history: list[dict] = []
    start_epoch = 0
    if ckpt is not None:
        _restore(ckpt, ckpt_path, core, optimizer, ranks)
        history, start_epoch = list(ckpt["history"]), int(ckpt["epoch"])
    model: nn.Module = core
    if ranks.distributed:
        device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(core, device_ids=device_ids)

    train_sampler = BucketBatchSampler(
        train_set.lengths,
        config["batch_size"],
        shuffle=True,
        seed=config["seed"],
        num_replicas=ranks.world_size,
        rank=ranks.rank,
        even=True,
    )
    test_sampler = BucketBatchSampler(
        test_set.lengths,
        config["batch_size"],
        shuffle=False,
        num_replicas=ranks.world_size,
        rank=ranks.rank,
        even=False,
    )
    train_loader, test_loader = _loader(train_set, train_sampler), _loader(test_set, test_sampler)

    _log(
        ranks,
        f"data: {corpus.name}: {len(train_set):,} train / {len(test_set):,} test examples, "
        f"vocabulary {len(vocab):,}; backend {args.backend} on {ranks.device}"
        + (f", {ranks.world_size} processes" if ranks.distributed else ""),
    )
    if start_epoch >= args.epochs:
        _log(
            ranks,
            f"{ckpt_path}: already trained {start_epoch} epoch(s), nothing to do for --epochs {args.epochs}",
        )
    for epoch in range(start_epoch, args.epochs):
        train_sampler.set_epoch(epoch)
        stats = _train_epoch(
            model, core, optimizer, train_loader, config, ranks, f"epoch {epoch + 1}/{args.epochs}"
        )
        accuracy = _evaluate(core, test_loader, ranks, config["amp"])
        record = {"epoch": epoch + 1, "loss": stats["loss"], "accuracy": accuracy, **stats}
        record = {k: record[k] for k in ("epoch", "loss", "accuracy", "epoch_seconds", "tokens_per_second")}
        history.append(record)
        _log(
            ranks,
            f"epoch {epoch + 1}/{args.epochs}  loss {record['loss']:.4f}  test accuracy {accuracy:.2%}  "
            f"{record['epoch_seconds']:.1f} s  {record['tokens_per_second']:,.0f} tokens/s",
        )
        rng_states = _gather(ranks, _rng_state(ranks.device))
        if ranks.is_main and ckpt_path is not None:
            state = {
                "format": CHECKPOINT_FORMAT,
                "config": config,
                "vocab": vocab.tokens,
                "model": core.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "history": history,
                "rng": rng_states,
            }
            _atomic_write(ckpt_path, lambda f, state=state: torch.save(state, f))
    digests = _gather(ranks, weights_digest(core))
    if ranks.is_main and args.json is not None:
        result = {
            "epochs": history,
            "backend": args.backend,
            "world_size": ranks.world_size,
            "weights_sha256": digests,
            "config": config,
        }
        _atomic_write(Path(args.json), lambda f: f.write(json.dumps(result, indent=2).encode()))
    if ranks.distributed:
        # Every rank finishes its collectives before any tears the process group down: a rank that
        # destroyed gloo's group while another still wrote its results aborted at exit (seen once in
        # CI: "terminate called without an active exception").
        dist.barrier()
    return 0


def run_train(args: argparse.Namespace) -> int:
    ranks = Ranks()
    try:
        ranks = _start_processes(args.device)
        return _train(args, ranks)
    except (DataError, TrainError) as e:
        prefix = f"[rank {ranks.rank}] " if ranks.distributed else ""
        print(f"{prefix}bigmodel train: error: {e}", file=sys.stderr)
        return 2
    finally:
        if ranks.distributed:
            # Drop reference cycles that may still hold the DDP reducer and gloo's work objects while
            # the interpreter is whole: destroyed later, during finalization, they can abort the
            # process (see torchrun_worker_exit).
            gc.collect()
            dist.destroy_process_group()


def torchrun_worker_exit(code: int) -> None:
    """Ends a torchrun worker of `bigmodel train` without the interpreter's finalization.

    Twice in CI runs (once before the barrier at the end of training was added, once after; never in
    the 30-odd local runs tried) a rank aborted after training had finished and its results were
    written: "terminate called without an active exception", a C++ thread object destroyed
    unjoined, at teardown (PyTorch's issue tracker describes the same class of exit-time SIGABRT
    with gloo's worker threads during interpreter finalization). The worker's work is done and its
    files are closed at this point, so it flushes its streams and exits with its code directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
