"""DeepSeek-OCR 2 on transformers' own implementation (`deepseek_ocr2`, transformers >= 5.10; the `v2` extra).

Everything that differs from v1 lives here: the config of the public checkpoint (`config.py`), loading and LoRA on the
fused 3-D experts (`loading.py`, `lora.py`), the processor-based collator (`collate.py`), the merge (`export.py`) and
the tiny TEST STAND-IN (`standin.py`). The LightningModule, DataModule and CLI are shared; `versions.py` (one level
up) reads the checkpoint's config.json and dispatches. Importing this package needs transformers 5.
"""
