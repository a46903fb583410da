"""The LightningDataModule: dataset sources -> `{"image", "text"}` samples -> collated batches in workers.

Sources: a hub dataset id, a local `imagefolder` (images + metadata.jsonl), a JSONL manifest of image path +
text, a `save_to_disk` folder, or `synthetic` (rendered Persian lines for the offline demo and tests).
Splits are strings like `train[:1000]` or `test[:200]`.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..families import Family, family
from ..families.detect import checkpoint_version
from ..training.checks import ConfigError, check_hub_reachable, check_model_source, hub_offline
from ..training.plan import RunPlan
from .batching import DEFAULT_INSTRUCTION, BadSamplePolicy, SampleCollator, split_instruction
from .images import MODES, Mode
from .render import LineKind, write_imagefolder
from .sampling import ResumableLoader, ShardedEpochSampler
from .travel import TravellingCollator, arrive

log = logging.getLogger(__name__)
SourceType = Literal["auto", "hub", "imagefolder", "jsonl", "disk", "synthetic"]
ModeName = Literal["tiny", "small", "base", "large", "gundam"]  # the keys of images.MODES
LOCAL_KINDS = ("imagefolder", "jsonl", "disk", "synthetic")
SPLIT_RE = re.compile(r"^(?P<name>[\w.-]+)(\[(?P<start>-?\d*):(?P<stop>-?\d*)\])?$")


def parse_split(spec: str) -> tuple[str, slice]:
    """`train[:1000]` -> ("train", slice(None, 1000)); `test` -> ("test", slice(None))."""
    match = SPLIT_RE.match(spec.strip())
    if not match:
        raise ValueError(f"split {spec!r} is not of the form name or name[start:stop]")
    start, stop = (int(match[k]) if match[k] else None for k in ("start", "stop"))
    return match["name"], slice(start, stop)


def detect_source(source: str) -> str:
    """What kind of source a string names, from what is on disk; anything else is a hub id."""
    path = Path(source)
    if path.suffix == ".jsonl" and (path.is_file() or "{split}" in source):
        return "jsonl"
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return "disk"
    return "imagefolder" if path.is_dir() else "hub"


def looks_local(source: str) -> bool:
    """`./x`, `/x`, `~/x`, `a/b/c`, a bare name (`mydata`) and `*.jsonl` name local data; only `owner/name` is a hub
    dataset (as for models)."""
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or source.endswith(".jsonl")


def used_splits(stage: str, hp: Mapping[str, Any]) -> list[str]:
    """The split strings a subcommand reads; a missing one that it needs is a config error."""
    needed = {"fit": "train_split", "validate": "val_split", "test": "test_split"}.get(stage)
    if needed and not hp[needed]:
        raise ConfigError(f"set data.{needed} to run `{stage}`")
    if stage == "predict" and not (hp["predict_inputs"] or hp["predict_split"]):
        raise ConfigError("set data.predict_inputs (files, folders, globs) or data.predict_split to run `predict`")
    names = {"fit": ["train_split", "val_split"], "validate": ["val_split"], "test": ["test_split"],
             "predict": ["predict_split"]}.get(stage, [])  # fmt: skip
    return [hp[name] for name in names if hp[name]]


def check_data_settings(stage: str, hp: Mapping[str, Any]) -> None:
    """What can be checked without reading any data: the instruction, the split strings, that the source (and each
    manifest) is there, that prediction inputs exist."""
    try:
        split_instruction(hp["instruction"])
        splits = used_splits(stage, hp)
        names = [parse_split(split)[0] for split in splits]
        check_source(hp["source"], hp["source_type"], names)
        if stage == "predict" and hp["predict_inputs"]:
            from ..files.predict import expand_inputs

            expand_inputs(hp["predict_inputs"])
    except (ValueError, FileNotFoundError) as error:
        raise ConfigError(str(error)) from None


def check_source(source: str, source_type: str, split_names: list[str]) -> None:
    if source_type == "synthetic":
        return  # rendered there if missing
    kind = detect_source(source) if source_type == "auto" else source_type
    if kind == "hub" and source_type == "auto" and looks_local(source):
        raise ConfigError(f"data source {source!r} not found (looked for {Path(source).expanduser().resolve()}): "
                          "give an existing folder or JSONL manifest, or a hub dataset id (owner/name)")  # fmt: skip
    if kind == "hub" and not hub_offline():
        check_hub_reachable(f"data source {source!r}")
    if kind in ("imagefolder", "disk") and not Path(source).expanduser().is_dir():
        raise ConfigError(f"data folder {source!r} not found (data.source_type {kind})")
    for name in split_names if kind == "jsonl" else []:
        if not Path(source.format(split=name)).expanduser().is_file():
            raise ConfigError(f"no manifest {source.format(split=name)!r} for split {name!r}")


@contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """datasets' progress bars ("Downloading data", "Generating train split") for hub downloads only: for local
    files they only announce a copy into the cache."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hide = not shown and not are_progress_bars_disabled()
    if hide:
        disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            enable_progress_bars()


class OCRSamples(Dataset):
    """Rows of any indexable table -> `{"image", "text", "index", "path"}`; image cells may be PIL images or paths.

    Never raises for one bad row: an unreadable row comes back with an `error` and the collator's policy
    decides (stop, naming split, index and path; or skip and count).
    """

    def __init__(self, rows: Any, image_column: str, text_column: str, root: Path | None = None) -> None:
        self.rows, self.image_column, self.text_column, self.root = rows, image_column, text_column, root

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample: dict[str, Any] = {"index": index, "path": "", "text": None, "image": None}
        try:
            row = self.rows[index]
            sample["text"], image = row.get(self.text_column), row.get(self.image_column)
            sample["path"] = cell_path(image, self.root)
            sample["image"] = open_cell(image, sample["path"])
        except Exception as error:  # noqa: BLE001  (any failure to read one row is that row's, reported by policy)
            sample["error"] = f"unreadable row: {type(error).__name__}: {error}"
        return sample


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_columns(columns: list[str], wanted: list[str], where: str) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ConfigError(f"{where} has no column(s) {missing}; its columns are {columns}: set data.image_column / "
                          "data.text_column")  # fmt: skip


def undecoded(table: Any, column: str) -> Any:
    """A datasets table whose image column comes as `{"bytes", "path"}` cells: `OCRSamples` opens them itself, and so
    knows the path of an image that cannot be decoded."""
    import datasets

    if isinstance(table.features.get(column), datasets.Image):
        return table.cast_column(column, datasets.Image(decode=False))
    return table


def cell_path(image: Any, root: Path | None) -> str:
    """The path of a table's image cell (a PIL image, an undecoded `{"bytes", "path"}` cell or a path), or ""."""
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or ""
    if isinstance(image, dict):
        return str(image.get("path") or "")
    return str((root or Path()) / str(image))


def open_cell(image: Any, path: str) -> Image.Image:
    """The image of a cell (not decoded yet: the collator's `load_image` decodes it)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and image.get("bytes"):
        return Image.open(io.BytesIO(image["bytes"]))
    return Image.open(path)


class OCRDataModule(L.LightningDataModule):
    def __init__(
        self,
        source: str = "hezarai/parsynth-ocr-200k",
        source_type: SourceType = "auto",
        train_split: str = "train[:1000]",
        val_split: str | None = "test[:100]",
        test_split: str | None = None,
        predict_inputs: list[str] | None = None,
        predict_split: str | None = None,
        image_column: str = "image_path",
        text_column: str = "text",
        instruction: str = DEFAULT_INSTRUCTION,
        mode: ModeName = "gundam",
        base_size: int | None = None,
        image_size: int | None = None,
        crop_mode: bool | None = None,
        train_on_responses_only: bool = True,
        max_length: int | None = None,
        batch_size: int = 2,
        eval_batch_size: int = 16,
        num_workers: int = 2,
        shuffle: bool = True,
        bad_sample_policy: BadSamplePolicy = "error",
        scan: bool = True,
        dataset_revision: str | None = None,
        synthetic_sizes: dict[str, int] | None = None,
        synthetic_kind: LineKind = "words",
        seed: int = 3407,
        tokenizer_name_or_path: str = "unsloth/DeepSeek-OCR",
        trust_remote_code: bool = False,
        revision: str | None = None,
        plan: RunPlan = RunPlan(),
    ) -> None:
        """
        Args:
            source: hub dataset id, imagefolder folder, JSONL manifest (may contain `{split}`), save_to_disk folder.
            source_type: what `source` is; `auto` looks at the disk, else hub. `synthetic` renders Persian lines
                into `source` (imagefolder layout) first if it is missing: offline demo and tests.
            train_split: training split and slice, e.g. `train[:1000]`.
            val_split: validation split and slice, or null for no validation.
            test_split: split for the `test` subcommand, or null.
            predict_inputs: for `predict`: image files, folders and glob patterns (no reference text).
            predict_split: for `predict`: a split of the source instead (its text is the reference, CER written).
            image_column: column holding the image (Parsynth: `image_path`; imagefolder: `image`).
            text_column: column holding the transcription.
            instruction: user prompt; must contain one `<image>`.
            mode: resolution mode: tiny (512), small (640), base (1024), large (1280), gundam (1024 + 640 crops).
                v2: the checkpoint's processor sets the sizes (1024 + 768 crops); only `crop_mode` applies.
            base_size: override the mode's global-view side.
            image_size: override the mode's crop-tile side.
            crop_mode: override whether large images are cut into tiles.
            train_on_responses_only: learn the transcription only (prompt and image masked with -100).
            max_length: cap on a sample's tokens (prompt, image and response), or null; a longer sample is a bad
                sample (`bad_sample_policy`: the run stops naming it, or it is skipped), never cut.
            batch_size: training micro-batch size.
            eval_batch_size: validation/test batch size (batched generation).
            num_workers: DataLoader worker processes (the collator's pixel work runs there).
            shuffle: shuffle the training split (off to compare runs on the same batches).
            bad_sample_policy: `error` stops at the first unusable sample, naming split, index and path; `skip`
                drops it and counts it (the `bad_samples` callback fails the run past its fraction).
            scan: before the model loads, decode and tokenise every sample of the splits the run uses and list every
                unusable one at once (policy `error`: stop there; `skip`: warn). About 0.4 s per 1,000 Parsynth-sized
                lines on one CPU core (v2 with `max_length`: its processor runs, ~15 s); false: a bad sample stops the
                run when it is reached.
            dataset_revision: hub revision to pin the dataset to.
            synthetic_sizes: split -> number of lines for `synthetic`, e.g. {train: 64, test: 16}.
            synthetic_kind: `words` (Persian words, joined, right to left) or `digits` (numbers of up to 8 Persian
                digits, one per fixed cell: what the demo's tiny stand-in learns to read in minutes).
            seed: seed of the synthetic lines.
            tokenizer_name_or_path: where the tokenizer comes from (linked to the model's checkpoint by the CLI).
            trust_remote_code: allow the checkpoint's code for the tokenizer (linked to the model's setting).
            revision: checkpoint revision for the tokenizer (linked to the model's setting).
            plan: the run's plan, set by the CLI before anything loads (plan.py): its model version picks the
                family's text side and collator; empty = the checkpoint's config.json.
        """
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer: Any = None
        self.version = ""  # v1 or v2: the plan's, else the checkpoint's (set with the tokenizer)
        self.datasets: dict[str, Dataset] = {}

    @property
    def mode(self) -> Mode:
        hp, base = self.hparams, MODES[self.hparams.mode]
        return Mode(
            hp.base_size or base.base_size,
            hp.image_size or base.image_size,
            base.crop_mode if hp.crop_mode is None else hp.crop_mode,
        )

    def resolved_type(self) -> str:
        hp = self.hparams
        return detect_source(hp.source) if hp.source_type == "auto" else hp.source_type

    def prepare_data(self) -> None:
        hp = self.hparams
        if hp.source_type == "synthetic" and not Path(hp.source).exists():
            write_imagefolder(hp.source, hp.synthetic_sizes or {"train": 64, "test": 16}, hp.seed, hp.synthetic_kind)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        for split in used_splits(stage, hp):
            if split not in self.datasets:
                self.datasets[split] = self.load_split(split)
        if stage == "predict" and hp.predict_inputs and "predict" not in self.datasets:
            from ..files.predict import ImageFiles, expand_inputs

            self.datasets["predict"] = ImageFiles(expand_inputs(hp.predict_inputs))
        if self.tokenizer is None:
            self.tokenizer = self.load_tokenizer()
        if hp.scan:
            self.scan(stage)

    @property
    def family(self) -> Family:
        """The model family of the plan, else of the checkpoint (known once the tokenizer loaded)."""
        return family(self.version)

    def load_tokenizer(self) -> Any:
        """The checkpoint's tokenizer, after the same check the model gets (a missing folder is no hub id)."""
        hp = self.hparams
        check_model_source(hp.tokenizer_name_or_path, hp.revision)
        plan = hp.plan if isinstance(hp.plan, RunPlan) else RunPlan(**hp.plan)
        try:
            self.version = plan.version or checkpoint_version(hp.tokenizer_name_or_path, hp.revision)
            return self.family.load_text_side(hp.tokenizer_name_or_path, hp.trust_remote_code, hp.revision)
        except (OSError, ValueError) as error:
            raise ConfigError(f"could not load the tokenizer of {hp.tokenizer_name_or_path!r}: {error}") from error

    def scan(self, stage: str) -> None:
        """Every sample of the stage's splits through the collator's checks, all problems reported at once."""
        from .scan import report_problems, scan_samples

        hp = self.hparams
        names = used_splits(stage, hp) + (["predict"] if "predict" in self.datasets and stage == "predict" else [])
        for split in names:
            collate = self.collator(False, split, inference=stage == "predict")
            start = time.perf_counter()
            problems = scan_samples(self.datasets[split], collate, hp.eval_batch_size, hp.num_workers)
            seconds = time.perf_counter() - start
            report_problems(split, problems, len(self.datasets[split]), hp.bad_sample_policy, seconds)

    def load_split(self, spec: str) -> Dataset:
        """One split of the configured source as samples; a source or split that is not there says so plainly."""
        try:
            with progress_bars(self.resolved_type() not in LOCAL_KINDS):
                return self.read_split(spec)
        except ConfigError:
            raise
        except (FileNotFoundError, ValueError, ConnectionError, OSError) as error:
            raise ConfigError(
                f"could not load split {spec!r} of {self.hparams.source!r} ({self.resolved_type()}): {error}\n"
                "Check the dataset id or folder and the split name; offline, a hub dataset must be in the local "
                "cache (or saved with save_to_disk and given as a folder)."
            ) from error

    def read_split(self, spec: str) -> Dataset:
        hp, kind = self.hparams, self.resolved_type()
        if kind == "jsonl":
            return self.load_jsonl(spec)
        import datasets

        if kind == "disk":
            name, part = parse_split(spec)
            table = datasets.load_from_disk(hp.source)
            table = table[name] if isinstance(table, datasets.DatasetDict) else table
            table = table.select(range(len(table))[part])
        elif kind in ("imagefolder", "synthetic"):
            table = datasets.load_dataset("imagefolder", data_dir=hp.source, split=spec)
        else:
            table = datasets.load_dataset(hp.source, split=spec, revision=hp.dataset_revision)
        check_columns(table.column_names, [hp.image_column, hp.text_column], f"{hp.source} {spec}")
        return OCRSamples(undecoded(table, hp.image_column), hp.image_column, hp.text_column)

    def load_jsonl(self, spec: str) -> Dataset:
        """A manifest of {image: path relative to the manifest, text}; `{split}` in the path picks the file."""
        hp = self.hparams
        name, part = parse_split(spec)
        path = Path(hp.source.format(split=name))
        if not path.is_file():
            raise FileNotFoundError(f"no manifest {path}")
        rows = read_jsonl(path)[part]
        check_columns(list(rows[0]) if rows else [], [hp.image_column, hp.text_column], f"{path} {spec}")
        return OCRSamples(rows, hp.image_column, hp.text_column, root=path.parent)

    def collator(self, with_prompts: bool, split: str = "train", inference: bool = False) -> SampleCollator:
        hp = self.hparams
        return self.family.collator(
            self.tokenizer, mode=self.mode, instruction=hp.instruction, max_length=hp.max_length,
            train_on_responses_only=hp.train_on_responses_only, with_prompts=with_prompts, policy=hp.bad_sample_policy,
            split=split, inference=inference,
        )  # fmt: skip

    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def epoch_progress(self) -> int:
        """Training batches the fit loop has processed in the current epoch (what a resume must skip)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer else 0

    def loader(self, split: str, train: bool, dataset: Dataset | None = None) -> DataLoader:
        hp, (rank, world) = self.hparams, self.rank_and_world()
        dataset = self.datasets[split] if dataset is None else dataset
        shuffle = train and hp.shuffle
        sampler = ShardedEpochSampler(len(dataset), shuffle, hp.seed, rank, world, pad=train)
        return ResumableLoader(
            dataset,
            batch_size=hp.batch_size if train else hp.eval_batch_size,
            sampler=sampler,
            num_workers=hp.num_workers,
            collate_fn=TravellingCollator(self.collator(not train, split, inference=split == "predict"), self.family),
            pin_memory=torch.cuda.is_available(),
            persistent_workers=hp.num_workers > 0,
            progress=self.epoch_progress if train else (lambda: 0),
            step_batches=self.step_batches() if train else 0,
        )

    def step_batches(self) -> int:
        """Micro-batches per optimizer step when the module normalises the loss over a step's label tokens
        (`step_token_loss`, decided when its model loaded: HF Trainer's normalisation): the training loader then
        reads each step's micro-batches ahead and counts them. 0 otherwise: batches one at a time, uncounted."""
        trainer = self.trainer
        if trainer is None or not trainer.lightning_module.step_token_loss:
            return 0
        return trainer.accumulate_grad_batches

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Batches travel compacted (travel.py); on the device they take the collator's layout again."""
        return arrive(batch, self.family)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.hparams.train_split, train=True)

    def val_dataloader(self) -> DataLoader:
        if not self.hparams.val_split:
            return []
        return self.loader(self.hparams.val_split, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.hparams.test_split, train=False)

    def predict_dataloader(self) -> DataLoader:
        """Images from `predict_inputs` (files, folders, globs), else the `predict_split` of the source."""
        hp = self.hparams
        split = "predict" if hp.predict_inputs else hp.predict_split
        return self.loader("predict", train=False, dataset=self.datasets[split])
