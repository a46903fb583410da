"""Data: the LightningDataModule (sources, splits, loaders), the collator every family shares, image decoding and
resolution modes, resumable sampling, the pre-scan of every sample, how batches travel from the workers, and the
synthetic Persian lines of the demo."""
