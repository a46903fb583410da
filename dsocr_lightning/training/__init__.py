"""The shared training core: the LightningModule and what it orchestrates (loading settings and steps, the run plan
and backend rule, optimizer and schedule, loss normalisation, decoding for validation, metrics, callbacks, early
checks). Nothing here asks which model version runs: it asks the family (`dsocr_lightning.families`)."""
