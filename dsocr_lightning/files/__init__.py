"""Input and output on disk: checkpoints (atomic, the resume checkpoint, which run one belongs to), output folders
swapped in whole and checked before anything loads, prediction inputs and writer, and export of a merged model."""
