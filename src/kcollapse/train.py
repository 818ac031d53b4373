"""Fine-tuning one generation: the Hugging Face Trainer on a generation's training mix.

The paper fine-tunes the full model (lr 1e-5, 0.5 epoch, 512-token chunks, batch 1 x grad-accum 4, weight decay
0.01, gradient checkpointing); LoRA through `peft` is one setting away and is merged back into the weights, so the
next generation starts from an ordinary checkpoint. Texts are joined with EOS and cut into equal chunks, as in
causal-LM pre-training, so no compute goes to padding; or one text per row (`packing: false`), where a (prompt,
completion) text is trained on its completion alone. The loss is computed from hidden states in vocabulary
chunks where the head allows it (lmloss.py): at a 262k vocabulary full logits would dominate memory.
`mixed_precision: bf16` runs a float32 model's matmuls in bfloat16 under autocast (the CPUs' bf16 matmuls are ~4x
their fp32 ones); weights, gradients and the optimizer stay float32.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch

from kcollapse import lmloss
from kcollapse.config import TrainConfig
from kcollapse.models import bos_prefix


Text = str | tuple[str, str]  # a text, or (prompt, completion): the loss reads the completion's tokens only


def _framed(tokenizer, texts: list[Text]) -> list[tuple[list[int], int]]:
    """Each text's ids opened with BOS when the tokenizer adds one (as in pre-training) and closed with EOS, and how
    many of its first ids are BOS and prompt (no loss). A (prompt, completion) pair is tokenised in two parts, as the
    scoring engine tokenises a prompt and its answer, so the trained ids are the ones an answer is scored on."""
    eos, bos = tokenizer.eos_token_id, bos_prefix(tokenizer)
    tail = [eos] if eos is not None else []
    prompts = [t[0] if isinstance(t, tuple) else "" for t in texts]
    bodies = [t[1] if isinstance(t, tuple) else t for t in texts]
    encoded = tokenizer(bodies + [p for p in prompts if p], add_special_tokens=False)["input_ids"]
    prompt_ids = iter(encoded[len(bodies):])
    framed = []
    for prompt, body in zip(prompts, encoded[: len(bodies)]):
        head = bos + (next(prompt_ids) if prompt else [])
        framed.append((head + body + tail, len(head) if prompt else 0))
    return framed


def pack(tokenizer, texts: list[str], chunk_tokens: int) -> list[list[int]]:
    """Texts joined (framed by `_framed`) and cut into chunks of `chunk_tokens`; a short tail is dropped unless it is
    all there is."""
    stream = [i for ids, _ in _framed(tokenizer, texts) for i in ids]
    chunks = [stream[i : i + chunk_tokens] for i in range(0, len(stream), chunk_tokens)]
    if len(chunks) > 1 and len(chunks[-1]) < chunk_tokens:
        chunks.pop()
    return [c for c in chunks if len(c) > 1]


def rows(tokenizer, texts: list[Text], chunk_tokens: int) -> list[list[int]]:
    """One framed text per row, its last `chunk_tokens` kept: no text attends to another and each starts at position
    0, as a prompt does at evaluation. A batch of rows is trained in bins (`_bins`), so little compute is padding."""
    return [ids for ids, _ in prompted_rows(tokenizer, texts, chunk_tokens)]


def prompted_rows(tokenizer, texts: list[Text], chunk_tokens: int) -> list[tuple[list[int], int]]:
    """`rows`, each with how many of its first ids are prompt (left out of the loss; 0 for a plain text)."""
    out = []
    for ids, prompt in _framed(tokenizer, texts):
        kept = ids[-chunk_tokens:]
        if len(kept) > 1:
            out.append((kept, max(0, prompt - (len(ids) - len(kept)))))
    return out


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, chunks: list[list[int]], prompt_lengths: list[int] | None = None):
        self.chunks, self.prompt_lengths = chunks, prompt_lengths

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        ids = torch.tensor(self.chunks[i], dtype=torch.long)
        labels = ids.clone()
        if self.prompt_lengths:
            labels[: self.prompt_lengths[i]] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def _collate(rows: list[dict]) -> dict:
    width = max(len(r["input_ids"]) for r in rows)
    batch = {}
    for key, fill in (("input_ids", 0), ("labels", -100), ("attention_mask", 0)):
        batch[key] = torch.stack([torch.nn.functional.pad(r[key], (0, width - len(r[key])), value=fill) for r in rows])
    if bool(batch["attention_mask"].all()):  # packed chunks are all full: no mask lets attention use its causal kernel
        del batch["attention_mask"]
    return batch


def _bins(rows: list[dict], capacity: int) -> dict:
    """A batch of rows (one text each) laid into as few rows of at most `capacity` tokens as hold them (first fit,
    longest first), position ids restarting at 0 for each text and each bin's padding tail: transformers' attention
    mask then keeps each text to itself, so this trains exactly what one padded row per text does (same loss and
    gradients to float precision) with little padding, and attention spans a bin, not the whole batch. Flattening the
    batch into one sequence did the same sums, but its attention grew with the square of the batch's tokens: 1.4-1.7x
    slower a step on the organism's letter texts (measured, 1 thread: drill 82 -> 65 ms, few-shot drill 188 -> 109,
    generation 0's joint phase 113 -> 80)."""
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i]["input_ids"]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        fit = next((b for b, r in enumerate(room) if r >= n), len(bins))
        if fit == len(bins):
            bins.append([])
            room.append(capacity)
        bins[fit].append(i)
        room[fit] -= n
    width = capacity - min(room)
    input_ids = torch.zeros(len(bins), width, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    position_ids = torch.zeros_like(input_ids)
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            ids = rows[i]["input_ids"]
            n = len(ids)
            input_ids[b, at : at + n] = ids
            labels[b, at + 1 : at + n] = rows[i]["labels"][1:]  # a text's first token is no target: no context
            position_ids[b, at : at + n] = torch.arange(n)
            at += n
        position_ids[b, at:] = torch.arange(width - at)  # the padding tail: a sequence of its own, never a target
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def _with_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model  # deferred: peft is slow to import

    lora = LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules or "all-linear")
    return get_peft_model(model, lora)


class _ProgressCallback:
    """Feeds the Trainer's step count into a rich progress bar."""

    def __init__(self, progress, total: int):
        from transformers import TrainerCallback  # deferred: transformers is slow to import

        class Callback(TrainerCallback):
            def on_step_end(cb, args, state, control, **kw):  # noqa: N805
                progress.update(self.task, completed=state.global_step)

        self.task = progress.add_task("train", total=total)
        self.callback = Callback()


def _stop_callback(stop_when, every: int):
    """Ends training at the first multiple of `every` steps where `stop_when(model)` holds."""
    from transformers import TrainerCallback  # deferred: transformers is slow to import

    class Callback(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % every == 0 and stop_when(model):
                control.should_training_stop = True

    return Callback()


def _trainer_class(chunked: bool, autocast: bool):
    """The Trainer, with the loss computed by lmloss (no batch x length x vocab logits) when `chunked`. The chunked
    loss calls the backbone itself, past the forward that accelerate wraps in autocast, so it opens its own."""
    from transformers import Trainer  # deferred: transformers is slow to import

    if not chunked:
        return Trainer

    class ChunkedLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            items = num_items_in_batch if self.model_accepts_loss_kwargs else None  # as the model's own loss
            device = inputs["input_ids"].device.type
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                return lmloss.causal_lm_loss(model, inputs["input_ids"], inputs["labels"],
                                             inputs.get("attention_mask"), items,
                                             self._head_in_bf16(model) if autocast else None,
                                             position_ids=inputs.get("position_ids"))

        def _head_in_bf16(self, model):
            """The output projection cast to bf16 once per optimizer step: the micro-batches of one step share
            its weights (keyed on the step, since the fused AdamW updates weights without bumping their version)."""
            step = self.state.global_step
            if getattr(self, "_cast_head", (None,))[0] != step:
                self._cast_head = None  # the old copy goes before the new one is made (335 MB at 262k x 640)
                self._cast_head = (step, model.get_output_embeddings().weight.detach().to(torch.bfloat16))
            return self._cast_head[1]

    return ChunkedLossTrainer


def finetune(model, tokenizer, texts: list[Text], cfg: TrainConfig, *, seed: int, work_dir: Path, progress=None,
             stop_when=None, check_every: int = 250):
    """Train `model` on `texts` and return it (LoRA adapters merged), in eval mode. A (prompt, completion) text is
    trained on its completion only (one text per row: `packing: false`). `stop_when(model) -> bool`, if given, is
    asked every `check_every` steps and ends training early when true (a skill reached; see gen0)."""
    from transformers import PrinterCallback, TrainingArguments  # deferred: transformers is slow to import
    from transformers.utils import logging as hf_logging  # deferred: transformers is slow to import

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    prompted = any(isinstance(t, tuple) for t in texts)
    if prompted and cfg.packing:
        raise ValueError("(prompt, completion) texts train one text per row: set packing: false")
    if cfg.packing:
        chunks, prompt_lengths = pack(tokenizer, texts, cfg.chunk_tokens), None
    else:
        framed = prompted_rows(tokenizer, texts, cfg.chunk_tokens)
        chunks, prompt_lengths = [ids for ids, _ in framed], [n for _, n in framed]
    if not chunks:
        raise ValueError("nothing to train on: the training texts are empty")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    chunked = lmloss.supports_chunked_loss(model)
    autocast = cfg.mixed_precision == "bf16" and next(model.parameters()).dtype == torch.float32
    tied = lmloss.tied_embedding(model) if chunked and cfg.method == "full" else None
    if tied is not None:  # see lmloss.tied_embedding: the lookup's gradient touches only the rows of the batch's tokens
        tied.sparse = True
    if cfg.method == "lora":
        model = _with_lora(model, cfg)
    model.train()
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = False
    args = TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1, weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_ratio, lr_scheduler_type=cfg.lr_scheduler, max_grad_norm=cfg.max_grad_norm,
        activation_checkpointing=cfg.gradient_checkpointing,
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, seed=seed, data_seed=seed,
        use_cpu=device.type == "cpu", dataloader_num_workers=0, remove_unused_columns=False,
        bf16=next(model.parameters()).dtype == torch.bfloat16 or (autocast and not chunked),
    )
    trainer = _trainer_class(chunked, autocast)(model=model, args=args, train_dataset=_Chunks(chunks, prompt_lengths),
                                                data_collator=_collate if cfg.packing else partial(_bins, capacity=cfg.chunk_tokens))
    trainer.remove_callback(PrinterCallback)  # the run records its own metrics; no dicts on stdout
    if stop_when is not None:
        trainer.add_callback(_stop_callback(stop_when, check_every))
    if progress is not None:
        steps = cfg.max_steps or max(1, int(len(chunks) * cfg.epochs / (cfg.batch_size * cfg.grad_accum) + 0.999))
        cb = _ProgressCallback(progress, steps)
        trainer.add_callback(cb.callback)
    try:
        trainer.train()
    finally:
        if tied is not None:
            tied.sparse = False
    if progress is not None:
        progress.remove_task(cb.task)
    model = trainer.model
    if cfg.method == "lora":
        model = model.merge_and_unload()
    if getattr(model.config, "use_cache", None) is not None:
        model.config.use_cache = True
    return model.eval()
