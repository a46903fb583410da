"""The LightningModule: DeepSeek-OCR + LoRA, loss per optimizer step, CER by batched generation.

It orchestrates; the model (remote code), collator, optimizer and metrics live in their own modules.
Weights load in `configure_model`, never in `__init__`, so `--print_config` touches nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import MeanMetric

from ..families import Family, family
from ..families.detect import standin_version
from ..fast import FastPaths
from ..fast.decode import release_decoder
from ..fast.layer_graphs import graphs_active, pad_length, skipped_graphs, stable_grads, zero_grads
from ..fast.moe import looped_expert_layers
from ..files.checkpoints import best_checkpoint
from ..files.folders import ForeignFilesError, replaced_folder
from .checks import ConfigError, check_precision, out_of_memory_message
from .generation import GenerationSettings, transcribe
from .line_metrics import LineMetrics, LoopSettings
from .loading import Backend, DType, LoadSettings, LoraSettings, load_model, set_inference
from .metrics import CERMetrics
from .optim import OptimizerName, build_optimizer, linear_warmup_decay
from .plan import RunPlan
from .step_mean import StepMean, StepSum
from .step_tokens import STEP_TOKENS_KEY, TOKENS_KEY
from .trainables import PickedExperts, check_loadable, reference_layout, reference_state_dict

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
LOSS_NORMALISATION = {
    False: "loss: each micro-batch's mean token loss, averaged over the optimizer step (HF Trainer's for a model "
    "that takes no loss keyword arguments)",
    True: "loss: each micro-batch's summed token loss over the label tokens of its whole optimizer step, all "
    "micro-batches and ranks (HF Trainer's for a model that takes num_items_in_batch)",
}


class DeepSeekOCRModule(L.LightningModule):
    def __init__(
        self,
        model_name_or_path: str = "unsloth/DeepSeek-OCR",
        backend: Backend = "auto",
        trust_remote_code: bool = False,
        revision: str | None = None,
        dtype: DType = "auto",
        load_in_4bit: bool = False,
        gradient_checkpointing: bool = True,
        unsloth_force_compile: bool = True,
        fast: FastPaths = FastPaths(),
        lora: LoraSettings = LoraSettings(),
        optimizer: OptimizerName = "adamw8bit",
        lr: float = 2e-4,
        weight_decay: float = 0.001,
        warmup_steps: int = 5,
        generation: GenerationSettings = GenerationSettings(),
        adapter_dir: str | None = None,
        adapter_path: str | None = None,
        normalize_persian: bool = False,
        loop: LoopSettings = LoopSettings(),
        log_samples: int = 4,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        make_standin: bool = False,
        cpu_threads: int | None = None,
        plan: RunPlan = RunPlan(),
    ) -> None:
        """
        Args:
            model_name_or_path: hub id or local folder (what `snapshot_download` made) of the checkpoint; its
                config.json says whether it is DeepSeek-OCR (v1, remote code) or DeepSeek-OCR 2 (v2, transformers 5).
            backend: `unsloth`, `transformers` (+ peft), or `auto` (Unsloth when a GPU and Unsloth are there).
            trust_remote_code: run the model code shipped in the checkpoint; DeepSeek-OCR (v1) cannot load without
                it (v2 runs transformers' own code).
            revision: hub revision (branch, tag or commit) to pin the checkpoint to.
            dtype: base weights' dtype; `auto` = bf16 where the GPU has it, else fp16, float32 on CPU.
            load_in_4bit: QLoRA-style 4-bit base weights (Unsloth backend).
            gradient_checkpointing: recompute activations in backward ("unsloth" mode, or non-reentrant).
            unsloth_force_compile: Unsloth's compile-time optimisations (Unsloth backend).
            fast: fast paths patched onto the loaded model: grouped experts (MoE as grouped matmuls, LoRA included;
                training and decoding), batched vision towers, decoder layers compiled for training (one GPU, bf16)
                and replayed as CUDA graphs (checkpointing off); off = the model's own code.
            lora: the adapter: rank, alpha, dropout, target modules, rslora, seed.
            optimizer: `adamw8bit` (bitsandbytes) or `adamw` (torch).
            lr: peak learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: optimizer steps of linear warmup from 0, then linear decay to 0 at the last step.
            generation: validation decoding (max new tokens, n-gram repeat block).
            adapter_dir: also save the final LoRA adapter + tokenizer here, and the best one beside it as
                `<adapter_dir>_best` (always saved in the run's log folder too). Only an earlier adapter of this tool
                is replaced there: a folder holding anything else is refused before the run starts.
            adapter_path: start from this saved LoRA adapter (validate/test/predict "after", or continue training).
            normalize_persian: also report CER after Persian normalisation (`*/cer_norm*`: Arabic yeh/kaf to
                Persian, tatweel dropped, ZWNJ and digits unified, whitespace collapsed).
            loop: when an output counts as a loop for `*/loop_rate` besides reaching max_new_tokens (README, "Loop
                rate"): the extra copies of a span it ends in, and the characters they span at least.
            log_samples: validation samples shown in TensorBoard each time (image, reference, prediction, CER).
            nonfinite_loss: on a NaN/inf loss, `stop` the run (no adapter is written over a good one) or `skip`
                that micro-batch; either way it is logged with the step.
            make_standin: TEST ONLY: write the tiny random stand-in checkpoint into `model_name_or_path` if that
                folder does not exist (offline demo and tests); never a real model.
            cpu_threads: intra-op threads of a CPU run (`torch.set_num_threads`); null keeps torch's default (one
                per core). A tiny model gains little from a second thread, which stalls whenever another process
                holds a core.
            plan: what the run is and how it runs (version, backend, expert kernel, compute dtype): set by the CLI
                before anything loads, replacing any value given (plan.py); empty = decided when the model loads.
        """
        super().__init__()
        self.save_hyperparameters()
        # The CLI may hand nested settings over as dicts; keep typed copies.
        self.lora = lora if isinstance(lora, LoraSettings) else LoraSettings(**lora)
        self.generation = generation if isinstance(generation, GenerationSettings) else GenerationSettings(**generation)
        self.load_settings = LoadSettings(
            model_name_or_path, backend, trust_remote_code, revision, dtype, load_in_4bit,
            gradient_checkpointing, unsloth_force_compile, adapter_path,
            fast if isinstance(fast, FastPaths) else FastPaths(**fast),
        )  # fmt: skip
        self.plan = plan if isinstance(plan, RunPlan) else RunPlan(**plan)
        self.version = self.plan.version  # v1 or v2: the plan's, else the loaded checkpoint's
        self.model: Any = None
        self.tokenizer: Any = None
        self.backend: str | None = None
        self.base_dtype = torch.float32
        self.train_loss = StepMean()  # micro-batch losses of the current optimizer step (weighted: see note_loss)
        self.nonfinite_skips = StepSum()  # micro-batches of the current optimizer step skipped for a NaN/inf loss
        self.unchecked_losses: list[tuple[int, torch.Tensor]] = []  # (batch_idx, loss) of this step (`stop`)
        self.val_cer = CERMetrics(persian_normalizer() if normalize_persian else None)
        self.val_lines = LineMetrics(loop if isinstance(loop, LoopSettings) else LoopSettings(**loop))
        self.val_loss = MeanMetric()  # synced once per epoch: ranks may see different numbers of batches
        self.strict_loading = False  # checkpoints hold the LoRA weights only
        self.saved_adapters: dict[str, list[Path]] = {}  # "last" / "best" -> folders written at the end of fit
        self.threads_before = 0  # torch's intra-op threads before `cpu_threads` changed them
        self.graph_pad = 0  # > 0: the decoder layers train as CUDA graphs, on batches padded to a multiple of it
        self.trainable: list[torch.nn.Parameter] = []  # set when training starts
        self.picked = PickedExperts([])  # the grouped experts' records of picked experts, found with the optimizer
        self.step_token_loss = False  # set when the model loads: the loss is normalised over a step's label tokens
        self.step_tokens: tuple[int, torch.Tensor | float] | None = None  # (global step, its label tokens on all ranks)

    # ---- weights -------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.hparams.make_standin and not Path(self.hparams.model_name_or_path).exists():
            family(standin_version()).write_standin(self.hparams.model_name_or_path)  # it logs where, once

    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)
        # cuDNN's attention plans a graph for every new shape, and every micro-batch has a new length: profiled on
        # an H100 at 1.3 ms of CPU per forward call and 6 ms per backward call. Flash / memory-efficient do not.
        torch.backends.cuda.enable_cudnn_sdp(False)
        if self.hparams.cpu_threads and self.trainer.strategy.root_device.type == "cpu":
            self.threads_before = torch.get_num_threads()
            torch.set_num_threads(self.hparams.cpu_threads)

    def teardown(self, stage: str) -> None:
        if self.threads_before:  # the process gets its thread count back (tests run many fits in one)
            torch.set_num_threads(self.threads_before)
            self.threads_before = 0

    def configure_model(self) -> None:
        if self.model is None:
            if self.plan.version:
                rank_zero_info(self.plan.line())
            loaded = load_model(
                self.load_settings,
                self.lora,
                self.data_parallel,
                self.trainer.strategy.root_device,
                AUTOCAST_DTYPES.get(str(self.trainer.precision)),
                self.plan,
            )
            self.model, self.tokenizer, self.backend, self.step_token_loss, self.version = loaded
            rank_zero_info(LOSS_NORMALISATION[self.step_token_loss])
            self.base_dtype = next(p.dtype for p in self.model.parameters() if not p.requires_grad)
            # from_pretrained returns an eval-mode model and Lightning keeps submodule modes: train mode here is
            # what HF Trainer gives the reference (LoRA dropout, gradient checkpointing); the evaluation loops
            # switch to eval mode and back themselves.
            self.model.train()
            self.graph_pad = self.load_settings.fast.graph_pad_multiple if graphs_active(self.model) else 0

    @property
    def family(self) -> Family:
        """The model family of the plan (else of the loaded checkpoint): what differs between versions."""
        return family(self.version)

    @property
    def data_parallel(self) -> bool:
        """Whether gradients go through DDP (or another parallel strategy): also on one device with a DDP strategy."""
        return self.trainer.world_size > 1 or isinstance(self.trainer.strategy, ParallelStrategy)

    def on_fit_start(self) -> None:
        check_data_parallel(self.trainer.strategy.model, self.model)

    def on_train_start(self) -> None:
        self.trainable = [p for p in self.parameters() if p.requires_grad]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.graph_pad:  # a backward graph's next replay overwrites its outputs: .grad must own its memory, also
            stable_grads(self.trainable)  # after validation (Lightning sets every .grad to None before it)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        if self.graph_pad:  # keep the gradient buffers that graphs need: zeroed in place
            zero_grads(p for group in optimizer.param_groups for p in group["params"])
        else:
            optimizer.zero_grad(set_to_none=True)
        self.picked.zero()

    def forward(self, batch: dict[str, Any], num_items_in_batch: torch.Tensor | float | None = None) -> Any:
        """The model's output; `num_items_in_batch` (training, `step_token_loss`): its loss is the batch's summed
        token loss divided by that, as HF Trainer passes it."""
        keys = self.family.forward_keys
        if self.graph_pad and self.training:  # a CUDA graph holds one length: a few lengths, a few graphs
            batch = pad_length(batch, self.graph_pad, self.family.tokenizer(self.tokenizer).pad_token_id)
            torch.compiler.cudagraph_mark_step_begin()  # the last micro-batch's backward ran: its buffers are free
        # no KV cache: the remote code builds one by default (config.use_cache), even in training, where nothing
        # reads it; its per-layer `layer_idx` also made torch.compile trace every layer anew (fast/compiled_layers.py)
        inputs = {k: batch[k] for k in keys} | {"use_cache": False}
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        if batch.get("right_padded") and self.backend == "transformers":
            # real tokens only see earlier (real) ones under the causal mask, so the padding mask adds nothing:
            # without it transformers skips building a [B, 1, L, L] mask (vmap, ~24 ms of CPU a forward, measured
            # on CPU) and attention may take the causal flash kernel. Same loss (tests/test_collate.py).
            inputs["attention_mask"] = None
        return self.family.forward(self.model, inputs, batch)

    def to_base_dtype(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Pixels travel as float32 and meet the vision towers in the base weights' dtype. (Done in the steps, not
        in `on_after_batch_transfer`: Lightning warns when a module overrides that hook beside a DataModule.)"""
        return self.family.cast_pixels(batch, self.base_dtype)

    # ---- training ------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        step_tokens = self.step_label_tokens(batch) if self.step_token_loss else None  # every rank, every micro-batch
        if not batch["texts"]:  # every sample of this batch was bad and skipped (counted by the bad_samples callback)
            return self.skip_micro_batch(nonfinite=False)
        loss = self.guarded_forward(self.to_base_dtype(batch), step_tokens).loss
        if self.hparams.nonfinite_loss == "stop":  # checked before the optimizer step: here it would be a sync
            self.unchecked_losses.append((batch_idx, loss.detach()))
        elif not torch.isfinite(loss):  # skip: decided before this backward
            self.on_nonfinite(loss, batch_idx)
            return self.skip_micro_batch(nonfinite=True)
        self.note_loss(loss.detach(), batch, step_tokens)
        self.nonfinite_skips.update(0.0)
        if step_tokens is None:
            return loss  # Lightning divides it by accumulate_grad_batches: the mean of the micro-batch means
        # HF Trainer: sum / step tokens, times the world size under DDP (which averages the ranks' gradients); the
        # factor accumulate_grad_batches undoes Lightning's division
        world = self.trainer.world_size if self.data_parallel else 1
        return loss * (self.trainer.accumulate_grad_batches * world)

    def step_label_tokens(self, batch: dict[str, Any]) -> torch.Tensor | float:
        """The label tokens of this micro-batch's optimizer step, over all its micro-batches and all ranks (HF
        Trainer's `num_items_in_batch` with `average_tokens_across_devices`): the training loader counts a step's
        micro-batches on this rank (`step_tokens.py`); the first micro-batch of each step sums them over ranks."""
        if STEP_TOKENS_KEY not in batch:
            raise RuntimeError(f"step_token_loss needs each training batch's {STEP_TOKENS_KEY!r}: batches from "
                               "OCRDataModule's training loader carry it")  # fmt: skip
        if self.step_tokens is None or self.step_tokens[0] != self.global_step:
            self.step_tokens = (self.global_step, self.all_ranks_tokens(batch[STEP_TOKENS_KEY]))
        return self.step_tokens[1]

    def all_ranks_tokens(self, count: int) -> torch.Tensor | float:
        """A step's label tokens summed over ranks, in floating point as Trainer's count reaches the loss. On one
        device a Python float: a tensor made here is copied to the GPU synchronously, a sync each step."""
        if not self.data_parallel:
            return float(count)
        # a collective: every rank gets here once per step, skipped batches included
        total = self.trainer.strategy.reduce(torch.tensor(count, dtype=torch.long, device=self.device), reduce_op="sum")
        return total.float()

    def note_loss(self, loss: torch.Tensor, batch: dict[str, Any], step_tokens: torch.Tensor | float | None) -> None:
        """The step's `train/loss` is what HF logs: the mean of the micro-batch means; or, normalised over the step's
        tokens, the step's summed token loss over its tokens (each micro-batch's mean weighted by its tokens)."""
        if step_tokens is None:
            self.train_loss.update(loss)
            return
        tokens = float(batch[TOKENS_KEY])
        self.train_loss.update(loss * step_tokens / tokens, weight=tokens)

    def skip_micro_batch(self, nonfinite: bool) -> torch.Tensor | None:
        """What a micro-batch that trains nothing returns. Its metric updates (weight 0) keep every rank's update count
        equal, so that all ranks compute (a collective under DDP) at each optimizer step. On one device: None (no
        backward). Under DDP every rank must join each backward's gradient all-reduce, or the others wait for ever:
        a zero loss over the trainable weights, whose gradient is exactly zero (the step averages the other ranks'
        gradients with this rank's zeros)."""
        self.train_loss.update(torch.zeros((), device=self.device), weight=0.0)
        self.nonfinite_skips.update(float(nonfinite))
        if not self.data_parallel:
            return None
        return torch.stack([p.sum() for p in self.parameters() if p.requires_grad]).sum() * 0.0

    def guarded_forward(self, batch: dict[str, Any], num_items_in_batch: torch.Tensor | float | None = None) -> Any:
        """Forward, with the remedies spelled out when the GPU runs out of memory."""
        try:
            return self(batch, num_items_in_batch)
        except torch.cuda.OutOfMemoryError as error:
            data = getattr(self._trainer, "datamodule", None)  # None outside a Trainer
            size = data.hparams.batch_size if data is not None else len(batch["texts"])
            mode = data.hparams.mode if data is not None else "?"
            raise RuntimeError(out_of_memory_message(error, size, mode)) from error

    def stop_on_nonfinite(self) -> None:
        """`nonfinite_loss: stop`: the step's micro-batch losses, checked with one read-back before the optimizer
        step (a check after each forward would make the CPU wait for the GPU there); raises on the first non-finite
        one, before its gradients reach a weight."""
        losses, self.unchecked_losses = self.unchecked_losses, []
        if losses and not bool(torch.stack([loss for _, loss in losses]).isfinite().all()):
            batch_idx, loss = next((index, loss) for index, loss in losses if not torch.isfinite(loss))
            self.on_nonfinite(loss, batch_idx)

    def on_train_end(self) -> None:
        """A window cut short (`should_stop` mid-accumulation: max_time, early stopping) never reaches an optimizer
        step: its losses are checked here."""
        self.stop_on_nonfinite()

    def on_nonfinite(self, loss: torch.Tensor, batch_idx: int) -> None:
        message = f"non-finite loss {loss.item()} at global step {self.global_step} (batch {batch_idx})"
        if self.hparams.nonfinite_loss == "stop":
            raise FloatingPointError(f"{message}: stopping; the last good checkpoint and adapter are kept")
        log.warning("%s on rank %d: skipping this micro-batch", message, self.global_rank)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """One `train/loss` per optimizer step, as HF logs it (`note_loss`), all ranks' together (NaN when every
        micro-batch was skipped); `train/nonfinite_skipped` counts the step's skipped micro-batches
        (all ranks). Both every step: Lightning would repeat a value not logged again."""
        self.stop_on_nonfinite()
        if self.train_loss.update_count:  # equal on every rank: all compute (gather) together
            self.log("train/loss", self.train_loss.compute(), on_step=True, prog_bar=True)
            self.log("train/nonfinite_skipped", self.nonfinite_skips.compute(), on_step=True)
        self.picked.tell(getattr(optimizer, "_optimizer", optimizer))
        self.log("train/lr", optimizer.param_groups[0]["lr"], on_step=True)
        self.log("train/grad_norm", gradient_norm(optimizer), on_step=True)  # before clipping, as HF logs it
        self.train_loss.reset()
        self.nonfinite_skips.reset()
        if self.graph_pad and self.global_step == 0:
            report_layer_graphs()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        _, layout, params = reference_layout(self)  # its state_dict names the reference's per-expert tensors
        self.picked = PickedExperts.of(self)
        optimizer = build_optimizer(params, hp.optimizer, hp.lr, hp.weight_decay, layout=layout)
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        scheduler = linear_warmup_decay(optimizer, hp.warmup_steps, int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- validation / test ---------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        set_inference(self.model, self.backend, True)

    on_test_epoch_start = on_validation_epoch_start

    def evaluate(self, batch: dict[str, Any], prefix: str, batch_idx: int) -> dict[str, list] | None:
        """The batch's loss and metrics; returns each line's prediction, CER, end and loop (for the error report)."""
        size = len(batch["texts"])
        if not size:
            return None
        self.val_loss.update(self(self.to_base_dtype(batch)).loss)
        self.log(f"{prefix}/loss", self.val_loss, batch_size=size)
        predictions, ended = transcribe(self.model, self.tokenizer, batch, self.generation)
        cers = self.val_cer.update(predictions, batch["texts"])
        loops = self.val_lines.update(predictions, batch["texts"], ended)
        if batch_idx == 0 and self.trainer.is_global_zero:
            views = self.family.global_views(batch)
            show_samples(
                self.logger, prefix, batch, views, predictions, cers, self.hparams.log_samples, self.global_step
            )
        return {"predictions": predictions, "cers": cers, "ended": ended, "loops": loops}

    def log_cer(self, prefix: str) -> None:
        """The CER metrics themselves: Lightning computes them over every rank's lines, logs and resets them."""
        self.log_dict(self.val_cer.metrics(prefix), prog_bar=True)
        self.log_dict(self.val_lines.metrics(prefix))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, list] | None:
        return self.evaluate(batch, "val", batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, list] | None:
        return self.evaluate(batch, "test", batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.log_cer("val")
        self.end_evaluation()

    def on_test_epoch_end(self) -> None:
        self.log_cer("test")
        self.end_evaluation()

    def end_evaluation(self) -> None:
        """Back to training: the decoder's KV buffers and CUDA graph are freed for the activations."""
        release_decoder(self.model)
        set_inference(self.model, self.backend, False)

    def on_predict_epoch_start(self) -> None:
        set_inference(self.model, self.backend, True)
        if (
            self.generation.merge_lora_in_predict
            and self.backend == "transformers"
            and hasattr(self.model, "merge_adapter")
        ):
            self.model.merge_adapter()  # predict-only process: nothing trains or saves this model afterwards
            rank_zero_info("predict: LoRA merged into the base weights for decoding (merge_lora_in_predict)")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """One record per image, in input order: path, transcription, whether it ended with the end token and the
        reference when the data has one; or path and the `error` that made the image unusable (policy `skip`)."""
        records = [{"index": index, "path": path, "error": why} for _, index, path, why in batch.get("skipped", [])]
        if batch["texts"]:
            predictions, ended = transcribe(self.model, self.tokenizer, self.to_base_dtype(batch), self.generation)
            columns = zip(batch["indices"], batch["paths"], predictions, ended, batch["texts"])
            records += [
                {"index": index, "path": path, "text": text, "ended": end, "reference": reference or None}
                for index, path, text, end, reference in columns
            ]
        return sorted(records, key=lambda record: record["index"])

    # ---- checkpoints and the adapter -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trainable (LoRA) weights, in the reference's per-expert names whatever kernel ran: the 3.4B
        frozen base stays in the model folder."""
        names, _, _ = reference_layout(self)
        checkpoint["state_dict"] = reference_state_dict(checkpoint["state_dict"], names)
        # plain types only, so that the checkpoint loads with torch.load(weights_only=True)
        checkpoint["hyper_parameters"] = {
            k: asdict(v) if is_dataclass(v) else v for k, v in checkpoint.get("hyper_parameters", {}).items()
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every LoRA weight this model trains must be in the checkpoint, and nothing else (Lightning loads it with
        strict=False, as the frozen base is not there): a mismatch stops with what differs."""
        names, _, _ = reference_layout(self)
        checkpoint["state_dict"] = check_loadable(checkpoint["state_dict"], names, "the checkpoint")

    def on_fit_end(self) -> None:
        """The adapter of the last step (`lora_model`) and, when validation ran, of the best checkpoint
        (`lora_model_best`), in the run's log folder and beside `adapter_dir`."""
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks, rank 0 writes
        if not self.trainer.is_global_zero:
            return
        lasts = [Path(log_dir or ".") / "lora_model"]
        if self.hparams.adapter_dir:
            lasts.append(Path(self.hparams.adapter_dir))
        what = f"LoRA adapter + tokenizer of the last step ({self.global_step})"
        self.saved_adapters["last"] = [target for target in lasts if self.save_adapter_to(target, what)]
        best = best_checkpoint(self.trainer)
        if best is not None:
            self.save_best_adapters(*best, lasts)

    def save_best_adapters(self, path: str, monitor: str, score: float, lasts: list[Path]) -> None:
        """`<last>_best` for each last-step folder, from the best checkpoint's LoRA weights."""
        targets = [last.with_name(f"{last.name}_best") for last in lasts]
        with trainable_weights_from(self, path) as step:
            what = f"best LoRA adapter ({monitor} {score:.4f} at step {step}, {Path(path).name})"
            self.saved_adapters["best"] = [target for target in targets if self.save_adapter_to(target, what)]

    def save_adapter_to(self, target: Path, what: str) -> bool:
        """Saves the adapter to `target` unless files that are not an earlier adapter of this tool appeared there
        since the start (checked then too): those stay untouched, the copies elsewhere are kept."""
        try:
            save_adapter(self.model, self.tokenizer, target)
        except ForeignFilesError as error:
            log.warning("%s not saved to %s: %s", what, target, error)
            return False
        rank_zero_info(f"{what} saved to {target}")
        return True


@contextmanager
def trainable_weights_from(module: L.LightningModule, checkpoint: str) -> Iterator[int]:
    """The module's trainable (LoRA) weights replaced by a checkpoint's for the duration; yields its step."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    params = dict(module.named_parameters())
    unknown = [key for key in saved["state_dict"] if key not in params]
    if unknown:
        raise ValueError(f"{checkpoint} has weights this model lacks: {unknown[:3]}")
    kept = {key: params[key].detach().clone() for key in saved["state_dict"]}
    with torch.no_grad():
        for key, value in saved["state_dict"].items():
            params[key].copy_(value)
        try:
            yield saved["global_step"]
        finally:
            for key, value in kept.items():
                params[key].copy_(value)


def report_layer_graphs() -> None:
    """Say whether the layers' first forwards and backwards were taken as CUDA graphs (torch skips quietly)."""
    skipped = skipped_graphs()
    if skipped:
        log.warning("layer CUDA graphs: torch skipped %d compiled graphs, which run without CUDA graphs (compiled "
                    "only); TORCH_LOGS=perf_hints says why", skipped)  # fmt: skip
    else:
        rank_zero_info("layer CUDA graphs: every compiled layer graph runs as a CUDA graph")


def check_data_parallel(wrapper: Any, model: Any) -> None:
    """Plain DDP (`ddp`, or `auto` on several devices) needs a gradient for every trainable weight in every
    backward: the grouped experts give one (their stacked LoRA weights serve every expert); transformers' per-expert
    loop does not for an expert no token picked, and DDP would then fail a step later with a long message."""
    if not isinstance(wrapper, DistributedDataParallel) or wrapper.find_unused_parameters:
        return
    looped = looped_expert_layers(model)
    if looped:
        raise ConfigError(
            f"{looped} MoE layers run transformers' per-expert loop (grouped experts off, or no native grouped "
            "matmul here: bf16 on Hopper or newer, or the CPU), where an idle expert gets no gradient: use "
            "--trainer.strategy ddp_find_unused_parameters_true"
        )


def save_adapter(model: Any, tokenizer: Any, target: Path) -> None:
    """PEFT-format adapter + tokenizer, written beside `target` then swapped in: never half a folder, never over
    files that are not an earlier adapter of this tool (`folders.ForeignFilesError`)."""
    with replaced_folder(target, "adapter", "adapter folder") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def gradient_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Total 2-norm of the gradients the optimizer is about to apply (unscaled under 16-mixed)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)


def persian_normalizer() -> Any:
    from .textnorm import normalize_persian

    return normalize_persian


def show_samples(logger: Any, prefix: str, batch: dict, views: list[torch.Tensor], predictions: list[str],
                 cers: list[float], count: int, step: int) -> None:  # fmt: skip
    """A few validation lines in TensorBoard: each image, and a table of reference | prediction | CER."""
    writer = getattr(logger, "experiment", None)
    if count <= 0 or not hasattr(writer, "add_image"):
        return
    rows = ["| # | reference | prediction | CER |", "|---|---|---|---|"]
    for i, (view, ref, pred, cer) in enumerate(zip(views, batch["texts"], predictions, cers)):
        if i == count:
            break
        image = (view.float().clamp(-1, 1) + 1) / 2  # the global view, [3, B, B] in [0, 1]
        writer.add_image(f"{prefix}_samples/{i}", image.cpu(), step)
        rows.append(f"| {i} | {ref} | {pred} | {cer:.3f} |")
    writer.add_text(f"{prefix}_samples", "\n".join(rows), step)
